"""Cross-engine benchmarks (clada-bench --compare): llama.cpp, ONNX Runtime, Hugging Face and CLADA
decode throughput on one model, interleaved in one process."""
