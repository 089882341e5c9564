"""The v1.3 variant suite (BEM_SPEC.md section 11, issue 20): PT1-PT4 and the multimodal mini mission."""
