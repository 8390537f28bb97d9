"""Publishing: the model card and the upload to the Hub."""
