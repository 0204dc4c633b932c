#!/usr/bin/env bash
# The embedded model's GGUF (98 MB) is larger than one device call may carry (64 MiB): split it here into two
# ignored parts, carry one per call while the GPU machine stays warm (its /tmp survives between calls), join there.
#   here:                                    bash benchmarks/embedded_parts.sh split
#   device call 1, carry [".gguf_parts/a"]:  bash benchmarks/embedded_parts.sh stash a
#   device call 2, carry [".gguf_parts/b"]:  bash benchmarks/embedded_parts.sh join   # prints the joined GGUF path
#   then:                                    python3 benchmarks/engine_parity.py "$(bash ... join)"
set -euo pipefail
cd "$(dirname "$0")/.."
parts=.gguf_parts joined=/tmp/jaxpaged_embedded.gguf
case "${1:-}" in
  split)
    src=$(.venv/bin/python -c "from jaxpaged.models.loader import embedded_model_path as p; print(p())")
    rm -rf "$parts" && mkdir -p "$parts/a" "$parts/b"
    half=$(( ($(stat -c %s "$src") + 1) / 2 ))
    head -c "$half" "$src" > "$parts/a/part"
    tail -c +"$((half + 1))" "$src" > "$parts/b/part"
    sha256sum "$src" | cut -d' ' -f1 > "$parts/b/sha256"
    ls -l "$parts"/*/part ;;
  stash)
    cp "$parts/${2:?a or b}/part" "/tmp/jaxpaged_gguf_part_$2" && echo "stashed part $2" >&2 ;;
  join)
    cat /tmp/jaxpaged_gguf_part_a "$parts/b/part" > "$joined"
    [ "$(sha256sum "$joined" | cut -d' ' -f1)" = "$(cat "$parts/b/sha256")" ] || { echo "checksum mismatch" >&2; exit 1; }
    echo "$joined" ;;
  *) echo "usage: $0 split | stash a | join" >&2; exit 2 ;;
esac
