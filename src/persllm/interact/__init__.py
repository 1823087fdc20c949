"""interact stage."""
