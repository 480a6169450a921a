# Helpers shared by tools/bench-serve.sh and tools/bench-registry.sh (sourced, not run):
# timing, medians, dropping the page cache, and the result table's rows and verdicts.
now() { date +%s%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1e6 }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# judge VALUE <=|>= LIMIT: "yes" or "NO"
judge() { awk -v v="$1" -v l="$3" -v op="$2" 'BEGIN { ok = (op == "<=") ? v <= l : v >= l; print ok ? "yes" : "NO" }'; }
ROWS=()
# row FIELD...: one tab-separated line of the result table
row() { ROWS+=("$(printf '%s\t' "$@")"); }
