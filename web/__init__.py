"""web: filled by a later issue (see DESIGN.md section 2)."""
