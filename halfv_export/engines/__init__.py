"""Runtime sessions over exported graphs (ONNX Runtime, TensorRT) and the generation loop over them.

Empty until the export stage lands (issue 3): nothing here is imported by the calibrate/flops commands.
"""
