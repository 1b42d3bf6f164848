"""Block formats: the bottom layer. Weight layouts, packing, and the plain-torch reference
quantize / dequantize that the native kernels (``llmopt.kernels``) and the quantizers
(``llmopt.quant``) both build on. Imports nothing from llmopt.

- ``layouts``: llmopt's own weight formats (int8/int4/int3/int2/fp8/fp4/w8a8/w4a8), their block
  layouts, ``QuantizedWeight``, ``quantize`` / ``dequantize``;
- ``rtn``: round-to-nearest quantizers (weights and run-time activations);
- ``gguf_quants``: GGUF block types (Q4_0 ... Q6_K) dequantized exactly as llama.cpp defines them.
"""
