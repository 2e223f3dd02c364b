"""The llama.cpp engine: GGUF models through llama-cpp-python (``pip install 'vlmlab[llamacpp]'``)."""
