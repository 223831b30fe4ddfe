"""Sample-quality metrics computed exactly as the ADM evaluation suite (guided-diffusion) does."""
