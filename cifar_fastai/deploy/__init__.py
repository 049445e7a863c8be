"""Deployment: the pickle-free model format (`safe`), ONNX and int8 export (`onnx`), the demo's serving logic (`serve`)."""
