"""Side-by-side human rating of inference runs (Parti's and GLIDE's evaluation)."""
