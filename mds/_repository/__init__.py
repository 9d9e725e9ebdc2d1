"""The model repository: folders of model versions that a runtime serves and follows."""
