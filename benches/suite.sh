#!/usr/bin/env bash
# The comparison suite: relsync against rsync (and the other baselines of each benchmark) in one
# session, on the same corpora, with one command. It builds the binaries once, generates the
# corpora once with fixed seeds, runs local-build.sh, push.sh, fleet.sh, small-files.sh and
# `relsync bench` in their machine-readable mode (RESULTS_DIR), and renders the per-scenario JSON
# into a markdown table and SVG charts with suite-report. It asserts nothing about time.
# See benches/README.md ("Comparison suite") for the environment variables.
set -euo pipefail

SCALE="${SCALE:-full}"
RUNS="${RUNS:-5}"
FLEET_RUNS="${FLEET_RUNS:-3}"
SCENARIOS="${SCENARIOS:-local big push bulk fleet small phases}"
SEED="${SEED:-1}"
SHM="${SHM:-/dev/shm}"
DISK="${DISK:-/var/tmp}"

die() {
	echo "suite: $*" >&2
	exit 2
}
log() { echo "==== $*" >&2; }

case $SCALE in
full)
	FILES=15000 BYTES=110MB BIG_SIZE=1G BULK_SIZE_MIB=1024 BULK_FILES=8
	SMALL_FILES=100000 SMALL_BYTES=200MB
	FLEET_NODES="${FLEET_NODES:-4 8 16}"
	;;
tiny)
	# Enough to go through every code path of the scripts in seconds; the figures mean nothing.
	FILES=200 BYTES=2MB BIG_SIZE=1M BULK_SIZE_MIB=4 BULK_FILES=2
	SMALL_FILES=500 SMALL_BYTES=1MB
	FLEET_NODES="${FLEET_NODES:-2}"
	;;
*) die "SCALE=$SCALE: use full or tiny" ;;
esac
for s in $SCENARIOS; do
	case $s in
	local | big | push | bulk | fleet | small | phases) ;;
	*) die "unknown scenario '$s' in SCENARIOS: use local, big, push, bulk, fleet, small and/or phases" ;;
	esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS=$RUNS is not a positive number"
[[ $FLEET_RUNS =~ ^[1-9][0-9]*$ ]] || die "FLEET_RUNS=$FLEET_RUNS is not a positive number"
[[ $EUID -eq 0 ]] || die "needs root (network namespaces, dropping the page cache)"
[[ $(stat -f -c %T "$SHM") == tmpfs ]] || die "$SHM is not tmpfs: mount one or set SHM"
[[ -d $DISK ]] || die "DISK=$DISK is not a directory"
for tool in hyperfine jq rsync ip tc /usr/bin/time; do
	command -v "$tool" >/dev/null ||
		die "$tool is missing: apt-get install hyperfine jq rsync iproute2 time"
done
has() { [[ " $SCENARIOS " == *" $1 "* ]]; }

BENCHES="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCHES")"
OUT="${OUT:-$BENCHES/results/$(date -u +%F)}"
mkdir -p "$OUT/raw" "$OUT/log"
OUT="$(realpath -- "$OUT")"

if [[ -z ${BIN_DIR:-} ]]; then
	command -v cargo >/dev/null || die "cargo not found: install Rust or set BIN_DIR"
	log "building relsync, relsyncd, relsync-testdata, quic-baseline and suite-report (release)"
	(cd "$REPO" && cargo build --release --quiet -p sync-cli -p sync-server -p relsync-testdata \
		-p relsync-benches --bin relsync --bin relsyncd --bin relsync-testdata --bin quic-baseline \
		--bin suite-report)
	BIN_DIR="$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release"
fi
BIN_DIR="$(realpath -- "$BIN_DIR")"
REPORT_BIN="${REPORT_BIN:-$BIN_DIR/suite-report}"
for b in relsync relsyncd relsync-testdata quic-baseline; do
	[[ -x $BIN_DIR/$b ]] || die "$b not found in $BIN_DIR: build it or set BIN_DIR"
done
[[ -x $REPORT_BIN ]] || die "suite-report not found at $REPORT_BIN: build it or set REPORT_BIN"

WORK="$(mktemp -d "$SHM/relsync-suite.XXXXXX")"
DWORK="$(mktemp -d "$DISK/relsync-suite.XXXXXX")"
cleanup() { rm -rf -- "$WORK" "$DWORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cpu_model() { awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo; }
{
	echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
	echo "- command: \`SCALE=$SCALE RUNS=$RUNS FLEET_RUNS=$FLEET_RUNS FLEET_NODES=\"$FLEET_NODES\" SCENARIOS=\"$SCENARIOS\" benches/suite.sh\`"
	echo "- commit: $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo unknown)"
	echo "- machine: $(nproc) CPUs ($(cpu_model)), $(free -g | awk '/^Mem:/ { print $2 }') GiB RAM, Linux $(uname -r)"
	echo "- rsync $(rsync --version | awk 'NR == 1 { print $3 }'), hyperfine $(hyperfine --version | awk '{ print $2 }')"
	echo "- load average at the start: $(cut -d' ' -f1-3 /proc/loadavg) (a shared machine: others may be compiling)"
} >"$OUT/machine.md"
{
	echo "\$ nproc"
	nproc
	echo "\$ free -g"
	free -g
	echo "\$ uname -r"
	uname -r
	echo "\$ grep -m1 'model name' /proc/cpuinfo"
	grep -m1 'model name' /proc/cpuinfo
} >"$OUT/machine.txt"
: >"$OUT/load.txt"

FAILED=()
# Runs one benchmark script; its report and log are kept, a failure is noted and the suite goes on.
run() { # name command...
	local name=$1
	shift
	log "$name: starting (load average $(cut -d' ' -f1-3 /proc/loadavg))"
	echo "$(date -u +%H:%M:%S) $name start: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/load.txt"
	if "$@" 2> >(tee "$OUT/log/$name.log" >&2); then
		log "$name: done"
	else
		log "$name: FAILED (exit $?), see $OUT/log/$name.log"
		FAILED+=("$name")
	fi
	echo "$(date -u +%H:%M:%S) $name end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/load.txt"
}

TREE="$WORK/tree"
if has local || has push || has fleet || has phases; then
	log "generating the release pair once (seed $SEED, $FILES files, $BYTES)"
	"$BIN_DIR/relsync-testdata" --seed "$SEED" --files "$FILES" --bytes "$BYTES" "$TREE" >&2
fi
SMALL="$DWORK/small"
if has small; then
	# On disk, so that the small-file runs can be cold.
	log "generating the small-file tree once (seed $SEED, $SMALL_FILES files, $SMALL_BYTES) in $DISK"
	"$BIN_DIR/relsync-testdata" --seed "$SEED" --files "$SMALL_FILES" --bytes "$SMALL_BYTES" "$SMALL" >&2
	rm -rf "$SMALL/b"
fi

# FILES and BYTES describe the given corpus in the scripts' reports.
common=(env RESULTS_DIR="$OUT/raw" SEED="$SEED" FILES="$FILES" BYTES="$BYTES" SHM="$SHM" BIN_DIR="$BIN_DIR")
local_scenarios=()
has local && local_scenarios+=(tree)
has big && local_scenarios+=(big)
if ((${#local_scenarios[@]})); then
	if has big; then
		log "generating the big-file pair once (seed $SEED, $BIG_SIZE)"
		"$BIN_DIR/relsync-testdata" --seed "$SEED" --big-file "$BIG_SIZE" "$WORK/big" >&2
	fi
	run local-build "${common[@]}" RUNS="$RUNS" SCENARIOS="${local_scenarios[*]}" \
		TREE_CORPUS="$TREE" BIG_CORPUS="$WORK/big" BIG_SIZE="$BIG_SIZE" \
		RELSYNC_BIN="$BIN_DIR/relsync" TESTDATA_BIN="$BIN_DIR/relsync-testdata" \
		bash "$BENCHES/local-build.sh"
	rm -rf "$WORK/big"
fi

push_scenarios=()
has push && push_scenarios+=(patch)
has bulk && push_scenarios+=(bulk)
has small && push_scenarios+=(small)
if ((${#push_scenarios[@]})); then
	run push "${common[@]}" RUNS="$RUNS" PUSH_SCENARIOS="${push_scenarios[*]}" CORPUS="$TREE" \
		BULK_SIZE_MIB="$BULK_SIZE_MIB" BULK_FILES="$BULK_FILES" SMALL_SRC="$SMALL/a" \
		bash "$BENCHES/push.sh"
fi

if has small; then
	run small-files "${common[@]}" RUNS="$RUNS" SMALL_SRC="$SMALL/a" DISK="$DWORK" \
		bash "$BENCHES/small-files.sh"
fi

if has fleet; then
	run fleet "${common[@]}" RUNS="$FLEET_RUNS" NODES="$FLEET_NODES" CORPUS="$TREE" \
		bash "$BENCHES/fleet.sh"
fi

if has phases; then
	# Warm by design (see the notes in phases.json): it splits one build into its phases.
	# shellcheck disable=SC2016 # the inner script expands its own arguments
	# The chart is relsync bench's own (--chart), drawn from the same runs.
	run phases bash -c '"$1" bench --corpus "$2" --runs "$3" --json --chart "$5" >"$4.tmp" && mv "$4.tmp" "$4"' \
		phases "$BIN_DIR/relsync" "$TREE" "$RUNS" "$OUT/raw/phases.json" "$OUT/raw/phases.svg"
fi

echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/machine.md"
log "rendering $OUT/summary.md and the charts"
"$REPORT_BIN" "$OUT" || FAILED+=(suite-report)
cat "$OUT/summary.md" 2>/dev/null || true
if ((${#FAILED[@]})); then
	die "failed: ${FAILED[*]} (logs in $OUT/log); the summary holds what ran"
fi
