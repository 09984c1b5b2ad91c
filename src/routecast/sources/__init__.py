"""Where traces come from: the synthetic generator, a Hugging Face model, and routing logs by format."""
