#!/usr/bin/env bash
# Small-file benchmark: an initial local sync of a tree of many small files into an empty
# directory, `relsync sync SRC/ DST` against `rsync -a SRC/ DST/`. The tree and the destination
# live on disk (DISK, default /var/tmp), and the page cache is dropped before every timed run, so
# each run reads the tree cold, as the first sync after a reboot or of a fresh checkout would.
# See benches/README.md for the environment variables it reads.
set -euo pipefail

RUNS="${RUNS:-5}"
SEED="${SEED:-1}"
SMALL_FILES="${SMALL_FILES:-100000}"
SMALL_BYTES="${SMALL_BYTES:-200MB}"
SMALL_SRC="${SMALL_SRC:-}"
DISK="${DISK:-/var/tmp}"
RESULTS_DIR="${RESULTS_DIR:-}"

die() {
	echo "small-files: $*" >&2
	exit 2
}
log() { echo "== $*" >&2; }

[[ $(uname -s) == Linux ]] || die "needs Linux (/proc/sys/vm/drop_caches); this is $(uname -s)"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS=$RUNS is not a positive number"
((RUNS >= 5)) || log "warning: RUNS=$RUNS; report medians of at least 5 runs"
[[ -d $DISK ]] || die "DISK=$DISK is not a directory"
for tool in hyperfine jq rsync; do
	command -v "$tool" >/dev/null || die "$tool is missing: install the Debian package $tool"
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z ${BIN_DIR:-} ]]; then
	command -v cargo >/dev/null || die "cargo not found: install Rust or set BIN_DIR"
	log "building relsync and relsync-testdata in release mode"
	(cd "$REPO" && cargo build --release --quiet -p sync-cli -p relsync-testdata \
		--bin relsync --bin relsync-testdata)
	BIN_DIR="$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release"
fi
for b in relsync relsync-testdata; do
	[[ -x $BIN_DIR/$b ]] || die "$b not found in $BIN_DIR: build it or set BIN_DIR"
done
RELSYNC="$(realpath -- "$BIN_DIR/relsync")"

WORK="$(mktemp -d "$DISK/relsync-small.XXXXXX")"
cleanup() { rm -rf -- "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n $SMALL_SRC ]]; then
	[[ -d $SMALL_SRC ]] || die "SMALL_SRC=$SMALL_SRC is not a directory"
	SRC="$(realpath -- "$SMALL_SRC")"
else
	log "generating $SMALL_FILES files ($SMALL_BYTES, seed $SEED) in $WORK"
	"$BIN_DIR/relsync-testdata" --seed "$SEED" --files "$SMALL_FILES" --bytes "$SMALL_BYTES" \
		"$WORK/corpus" >&2
	SRC="$WORK/corpus/a"
fi
FILE_COUNT=$(find "$SRC" -type f | wc -l)

# Cold needs both a disk to be cold on and the right to drop the cache.
if [[ $(stat -f -c %T "$SRC") == tmpfs || $(stat -f -c %T "$WORK") == tmpfs ]]; then
	CACHE_NOTE="warm: the tree is on tmpfs, no page cache to drop"
	DROP=""
elif [[ $EUID -ne 0 ]]; then
	CACHE_NOTE="warm: not root, cannot drop the page cache"
	DROP=""
else
	CACHE_NOTE="cold: source and destination on disk ($(df --output=fstype "$WORK" | tail -1)), page cache dropped before each run"
	DROP="sync; echo 3 >/proc/sys/vm/drop_caches"
fi
log "$FILE_COUNT files in $SRC; $CACHE_NOTE"

# The reset before each run (not timed) and the timed commands, as scripts for hyperfine -N.
cat >"$WORK/prep.sh" <<EOF
rm -rf '$WORK/dst' '$WORK/cache'
mkdir '$WORK/cache'
$DROP
EOF
# A fresh hash cache for relsync: a first sync has none.
echo "RELSYNC_CACHE_DIR='$WORK/cache' exec '$RELSYNC' sync '$SRC/' '$WORK/dst' >/dev/null" >"$WORK/step-relsync.sh"
echo "exec rsync -a '$SRC/' '$WORK/dst/'" >"$WORK/step-rsync.sh"
for tool in relsync rsync; do
	log "$tool: $RUNS timed runs into an empty directory"
	hyperfine --style basic --runs "$RUNS" -N --prepare "bash $WORK/prep.sh" \
		--command-name "$tool" --export-json "$WORK/$tool.json" "bash $WORK/step-$tool.sh" >&2
	diffs=$(rsync -rlpcn --delete -i "$SRC/" "$WORK/dst/" | head -5)
	[[ -z $diffs ]] || die "$tool: the copy differs from the source:
$diffs"
done

median() { jq ".results[0].median" "$WORK/$1.json"; }
report() {
	echo
	echo "# Initial local sync of $FILE_COUNT small files, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $RUNS runs each"
	echo
	echo "$CACHE_NOTE."
	echo
	echo "| tool | median s | min s | max s |"
	echo "|---|---:|---:|---:|"
	for tool in relsync rsync; do
		jq -r --arg t "$tool" '.results[0] | "| \($t) | \(.median * 1000 | round / 1000) | \(.min * 1000 | round / 1000) | \(.max * 1000 | round / 1000) |"' "$WORK/$tool.json"
	done
	echo
	awk -v r="$(median rsync)" -v s="$(median relsync)" 'BEGIN { printf "- rsync ÷ relsync: %.2f\n", r / s }'
}

if [[ -n $RESULTS_DIR ]]; then
	mkdir -p "$RESULTS_DIR"
	cp "$WORK/relsync.json" "$RESULTS_DIR/small-local-relsync.json"
	cp "$WORK/rsync.json" "$RESULTS_DIR/small-local-rsync.json"
	# The common summary benches/suite.sh collects (read by suite-report).
	cold=false
	[[ -n $DROP ]] && cold=true
	for tool in relsync rsync; do
		jq -c --arg name "$([[ $tool == rsync ]] && echo "rsync -a" || echo relsync)" \
			'.results[0] | {name: $name, runs: (.times | length), median_s: .median, min_s: .min,
			 max_s: .max, wire_bytes: null}' "$WORK/$tool.json"
	done | jq -s --arg t "initial local sync of $FILE_COUNT small files" --arg n "$CACHE_NOTE" \
		--argjson c "$cold" '{scenario: "small-local", group: "small", title: $t, cold: $c,
		cache_note: $n, nodes: null, tools: .}' >"$RESULTS_DIR/small-local.summary.json"
fi
report | tee ${RESULTS_DIR:+"$RESULTS_DIR/small-report.md"}
