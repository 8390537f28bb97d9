"""Models and files: loading, GGUF, the demo model, prompts and data, output folders, Hub access."""
