#!/usr/bin/env bash
# Local release-build benchmark: how long it takes to build release B on a node that holds release A,
# with relsync, with `rsync --link-dest`, and with the `cp -al` link-farm floor. Runs on tmpfs.
# See benches/README.md for what it measures and the environment variables it reads.
set -euo pipefail

RUNS="${RUNS:-5}"
TOOLS="${TOOLS:-rsync cpal relsync}"
SCENARIOS="${SCENARIOS:-tree big}"
SEED="${SEED:-1}"
FILES="${FILES:-15000}"
BYTES="${BYTES:-110MB}"
BIG_SIZE="${BIG_SIZE:-1G}"
SHM="${SHM:-/dev/shm}"
RESULTS_DIR="${RESULTS_DIR:-}"
TREE_CORPUS="${TREE_CORPUS:-}"
BIG_CORPUS="${BIG_CORPUS:-}"

die() {
	echo "local-build: $*" >&2
	exit 2
}
log() { echo "== $*" >&2; }

[[ $(uname -s) == Linux ]] || die "needs Linux (tmpfs, GNU cp and time); this is $(uname -s)"
[[ -d $SHM ]] || die "$SHM does not exist: mount a tmpfs there or point SHM at one"
[[ $(stat -f -c %T "$SHM") == tmpfs ]] ||
	die "$SHM is $(stat -f -c %T "$SHM"), not tmpfs: mount one (mount -t tmpfs tmpfs $SHM) or set SHM"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS=$RUNS is not a positive number"
((RUNS >= 5)) || log "warning: RUNS=$RUNS; report medians of at least 5 runs"
for tool in $TOOLS; do
	case $tool in
	rsync | cpal | relsync) ;;
	*) die "unknown tool '$tool' in TOOLS: use rsync, cpal and/or relsync" ;;
	esac
done
for scenario in $SCENARIOS; do
	case $scenario in
	tree | big) ;;
	*) die "unknown scenario '$scenario' in SCENARIOS: use tree and/or big" ;;
	esac
done

# Bytes in a size written as the generator takes it (110MB, 512M, 1G).
size_bytes() {
	local n=${1%%[!0-9]*} unit=${1##*[0-9]}
	case ${unit^^} in
	"" | B) echo "$n" ;;
	K | KIB) echo $((n << 10)) ;;
	M | MIB) echo $((n << 20)) ;;
	G | GIB) echo $((n << 30)) ;;
	KB) echo $((n * 1000)) ;;
	MB) echo $((n * 1000000)) ;;
	GB) echo $((n * 1000000000)) ;;
	*) die "cannot read size '$1': use e.g. 110MB, 512M or 1G" ;;
	esac
}
size_bytes "$BYTES" >/dev/null
size_bytes "$BIG_SIZE" >/dev/null
[[ $EUID -eq 0 ]] || log "warning: not root; the benchmark is meant to run as root"

# Installs a missing Debian package when running as root.
need() {
	command -v "$1" >/dev/null && return
	[[ $EUID -eq 0 ]] || die "$1 is missing: install the Debian package $2 (apt-get install $2)"
	log "installing Debian package $2"
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
	command -v "$1" >/dev/null || die "$1 is still missing after installing $2"
}
need hyperfine hyperfine
need jq jq
need /usr/bin/time time
need rsync rsync

has_tool() { [[ " $TOOLS " == *" $1 "* ]]; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
packages=()
[[ -n ${TESTDATA_BIN:-} ]] || packages+=(-p relsync-testdata)
if has_tool relsync && [[ -z ${RELSYNC_BIN:-} ]]; then packages+=(-p sync-cli); fi
if ((${#packages[@]})); then
	command -v cargo >/dev/null || die "cargo not found: install Rust or set TESTDATA_BIN and RELSYNC_BIN"
	log "building ${packages[*]} in release mode"
	(cd "$REPO" && cargo build --release --quiet "${packages[@]}")
	TARGET="$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)"
	TESTDATA_BIN="${TESTDATA_BIN:-$TARGET/release/relsync-testdata}"
	RELSYNC_BIN="${RELSYNC_BIN:-$TARGET/release/relsync}"
fi
[[ -x $TESTDATA_BIN ]] || die "generator not found at $TESTDATA_BIN: build it or set TESTDATA_BIN"
TESTDATA_BIN="$(realpath -- "$TESTDATA_BIN")"
if has_tool relsync; then
	[[ -x $RELSYNC_BIN ]] || die "relsync not found at $RELSYNC_BIN: build sync-cli or set RELSYNC_BIN"
	RELSYNC_BIN="$(realpath -- "$RELSYNC_BIN")"
fi

WORK="$(mktemp -d "$SHM/relsync-bench.XXXXXX")"
cleanup() { rm -rf -- "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Rough space check: the corpus pair, plus A and B on the node, plus slack for staging.
needed=0
[[ " $SCENARIOS " == *" tree "* ]] && needed=$((needed + 6 * $(size_bytes "$BYTES")))
[[ " $SCENARIOS " == *" big "* ]] && needed=$((needed + 6 * $(size_bytes "$BIG_SIZE")))
avail=$(($(stat -f -c '%a * %S' "$SHM")))
((avail > needed)) || die "$SHM has $((avail >> 20)) MiB free, about $((needed >> 20)) MiB needed"

declare -A MEDIAN MIN MAX CPU RSS GEN PAIRED

# Writes the corpus of a scenario into $WORK/$1 (or links the one given in TREE_CORPUS or
# BIG_CORPUS, left untouched) and the change lists the cp -al floor replays.
make_corpus() {
	local scenario=$1 dir=$WORK/$1 args=(--seed "$SEED") given
	[[ $scenario == big ]] && given=$BIG_CORPUS || given=$TREE_CORPUS
	if [[ -n $given ]]; then
		[[ -d $given/a && -d $given/b && -f $given/summary.json ]] ||
			die "$given is not a corpus: expected a/, b/ and summary.json from relsync-testdata"
		log "$scenario: using the corpus in $given"
		mkdir -p "$dir"
		ln -s "$(realpath -- "$given")" "$dir/corpus"
		GEN[$scenario]="given"
	else
		if [[ $scenario == big ]]; then
			args+=(--big-file "$BIG_SIZE")
		else
			args+=(--files "$FILES" --bytes "$BYTES")
		fi
		log "$scenario: generating corpus (${args[*]})"
		local started ended
		started=$(date +%s%N)
		"$TESTDATA_BIN" "${args[@]}" "$dir/corpus" >&2
		ended=$(date +%s%N)
		GEN[$scenario]=$(awk -v ns=$((ended - started)) 'BEGIN { printf "%.2f", ns / 1e9 }')
	fi
	local summary=$dir/corpus/summary.json
	jq -r '(.edited + .added + [.renamed[].to] + .mode_changed)[]' "$summary" >"$dir/replace.lst"
	jq -r '(.removed + [.renamed[].from])[]' "$summary" >"$dir/delete.lst"
	comm -23 \
		<(cd "$dir/corpus/a" && find . -mindepth 1 -type d | sort) \
		<(cd "$dir/corpus/b" && find . -mindepth 1 -type d | sort) |
		sort -r >"$dir/rmdir.lst"
}

# Writes the setup script (node holds A) and the timed script of one tool.
write_scripts() {
	local scenario=$1 tool=$2 dir=$WORK/$1
	local a=$dir/corpus/a b=$dir/corpus/b node=$dir/node cache=$dir/cache
	local prep=$dir/prep-$tool.sh step=$dir/step-$tool.sh
	case $tool in
	rsync | cpal)
		cat >"$prep" <<-EOF
			set -e
			rm -rf '$node'
			mkdir -p '$node/releases'
			cp -a '$a' '$node/releases/a'
		EOF
		;;
	relsync)
		# Cold cache: the source hash cache starts empty for the timed deploy.
		cat >"$prep" <<-EOF
			set -e
			rm -rf '$node' '$cache'
			mkdir -p '$node' '$cache'
			RELSYNC_CACHE_DIR='$cache' '$RELSYNC_BIN' deploy '$a' '$node' --release-id a >/dev/null
			rm -rf '$cache'
			mkdir -p '$cache'
		EOF
		;;
	esac
	case $tool in
	rsync)
		echo "rsync -a --delete --link-dest=../a '$b/' '$node/releases/b/'" >"$step"
		;;
	cpal)
		# Replaced files are unlinked first (--remove-destination) so A's inodes stay untouched.
		cat >"$step" <<-EOF
			set -e
			cp -al '$node/releases/a' '$node/releases/b'
			cd '$b'
			xargs -d '\n' -r -a '$dir/replace.lst' cp --parents --remove-destination -p -t '$node/releases/b' --
			cd '$node/releases/b'
			xargs -d '\n' -r -a '$dir/delete.lst' rm -f --
			xargs -d '\n' -r -a '$dir/rmdir.lst' rmdir --
		EOF
		;;
	relsync)
		echo "RELSYNC_CACHE_DIR='$cache' exec '$RELSYNC_BIN' deploy '$b' '$node' --release-id b" >"$step"
		;;
	esac
}

# Checks that the node holds exact copies of A and B (content, modes, symlinks; not mtimes).
verify() {
	local scenario=$1 tool=$2 dir=$WORK/$1 diffs side
	for side in a b; do
		if [[ ! -d $dir/node/releases/$side ]]; then
			log "warning: $tool left no $dir/node/releases/$side; result not verified"
			continue
		fi
		diffs=$(rsync -rlpcn --delete -i "$dir/corpus/$side/" "$dir/node/releases/$side/" | head -5)
		[[ -z $diffs ]] || die "$scenario/$tool: release $side on the node differs from the corpus:
$diffs"
	done
}

# Times one run of every tool, in the order given, each with its own hyperfine call (one run, its
# prepare untimed): rounds interleave the tools, so a machine that slows down or speeds up during
# the benchmark weighs on each tool alike.
run_round() { # scenario round
	local scenario=$1 round=$2 dir=$WORK/$1 tool
	for tool in $TOOLS; do
		hyperfine --style none --runs 1 -N \
			--prepare "bash $dir/prep-$tool.sh" \
			--command-name "$tool" \
			--export-json "$dir/$tool.round-$round.json" \
			"bash $dir/step-$tool.sh" >/dev/null 2>&1 ||
			die "$scenario/$tool failed in round $round; run bash $dir/step-$tool.sh by hand to see why"
	done
}

# Merges one tool's rounds into hyperfine's JSON shape (times, median, min, max, mean user and
# system seconds), then takes its peak RSS and verifies what it built.
collect() { # scenario tool
	local scenario=$1 tool=$2 dir=$WORK/$1
	local json=$dir/$tool.json
	jq -s '{results: [{command: .[0].results[0].command,
		times: map(.results[0].times[0]),
		user: (map(.results[0].user) | add / length),
		system: (map(.results[0].system) | add / length)}
		| .times as $t | ($t | sort) as $s
		| . + {median: (if ($s | length) % 2 == 1 then $s[($s | length) / 2 | floor]
			else ($s[($s | length) / 2 - 1] + $s[($s | length) / 2]) / 2 end),
			min: $s[0], max: $s[-1], mean: ($t | add / length)}]}' \
		"$dir/$tool".round-*.json >"$json"
	MEDIAN[$scenario/$tool]=$(jq '.results[0].median' "$json")
	MIN[$scenario/$tool]=$(jq '.results[0].min' "$json")
	MAX[$scenario/$tool]=$(jq '.results[0].max' "$json")
	CPU[$scenario/$tool]=$(jq '.results[0].user + .results[0].system' "$json")
	# One more run, untimed by hyperfine, for the peak RSS of the largest process.
	bash "$dir/prep-$tool.sh"
	/usr/bin/time -f %M -o "$dir/rss-$tool" bash "$dir/step-$tool.sh" >/dev/null
	RSS[$scenario/$tool]=$(awk '{ kib = $1 } END { printf "%.1f", kib / 1024 }' "$dir/rss-$tool")
	verify "$scenario" "$tool"
	[[ -z $RESULTS_DIR ]] || { mkdir -p "$RESULTS_DIR" && cp "$json" "$RESULTS_DIR/$scenario-$tool.json"; }
	rm -rf "$dir/node" "$dir/cache"
}

measure() { # scenario
	local scenario=$1 tool i
	for tool in $TOOLS; do
		write_scripts "$scenario" "$tool"
	done
	log "$scenario: $RUNS rounds of one timed run of each of: $TOOLS (each on a fresh copy of the node holding A)"
	for i in $(seq "$RUNS"); do
		run_round "$scenario" "$i"
	done
	for tool in $TOOLS; do
		collect "$scenario" "$tool"
	done
	PAIRED[$scenario]=$(paired "$scenario")
}

# The median over rounds of relsync's time divided by cp -al's in the same round.
paired() { # scenario
	local dir=$WORK/$1
	[[ " $TOOLS " == *" relsync "* && " $TOOLS " == *" cpal "* ]] || { echo "n/a"; return; }
	jq -n --slurpfile r "$dir/relsync.json" --slurpfile c "$dir/cpal.json" '
		[$r[0].results[0].times, $c[0].results[0].times] | transpose | map(.[0] / .[1]) | sort
		| if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end
		| . * 100 | round / 100'
}

ratio() {
	local top=${MEDIAN[$1]:-} bottom=${MEDIAN[$2]:-}
	if [[ -n $top && -n $bottom ]]; then
		awk -v t="$top" -v b="$bottom" 'BEGIN { printf "%.2f", t / b }'
	else
		echo "n/a"
	fi
}

# The common summary benches/suite.sh collects (one RESULTS_DIR/local-SCENARIO.summary.json,
# read by suite-report): the tools' medians, min and max in seconds; nothing goes on a wire here.
write_summary() { # scenario
	local scenario=$1 tool name title
	[[ -n $RESULTS_DIR ]] || return 0
	if [[ $scenario == tree ]]; then
		title="local build of release B from A ($(jq -r '"\(.b.files) files, \(.b.bytes / 1e6 | floor) MB"' "$WORK/$scenario/corpus/summary.json"))"
	else
		title="local build: one $BIG_SIZE file with 10 small edits"
	fi
	for tool in $TOOLS; do
		case $tool in
		rsync) name="rsync --link-dest" ;;
		cpal) name="cp -al + changed files" ;;
		*) name=$tool ;;
		esac
		jq -c --arg name "$name" '.results[0] | {name: $name, runs: (.times | length),
			median_s: .median, min_s: .min, max_s: .max, wire_bytes: null}' "$RESULTS_DIR/$scenario-$tool.json"
	done | jq -s --arg s "local-$scenario" --arg t "$title" '{scenario: $s, group: "local", title: $t,
		cold: false, cache_note: "tmpfs: corpus and node in memory, no page cache to drop",
		nodes: null, tools: .}' >"$RESULTS_DIR/local-$scenario.summary.json"
}

for scenario in $SCENARIOS; do
	make_corpus "$scenario"
	measure "$scenario"
	write_summary "$scenario"
	rm -rf "${WORK:?}/$scenario"
done

generated() { # scenario
	if [[ ${GEN[$1]} == given ]]; then
		echo "corpus given in $([[ $1 == big ]] && echo BIG_CORPUS || echo TREE_CORPUS)"
	else
		echo "generated in ${GEN[$1]} s"
	fi
}

report() {
	local scenario tool
	echo
	echo "# Local release build, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, tmpfs at $SHM, $RUNS interleaved rounds"
	for scenario in $SCENARIOS; do
		echo
		if [[ $scenario == tree ]]; then
			echo "## Build release B from A: seed $SEED, $FILES files, $BYTES ($(generated tree))"
		else
			echo "## Big file: one $BIG_SIZE file with 10 small edits ($(generated big))"
		fi
		echo
		echo "| tool | median s | min s | max s | CPU s (mean) | peak RSS MiB |"
		echo "|---|---:|---:|---:|---:|---:|"
		for tool in $TOOLS; do
			printf '| %s | %.3f | %.3f | %.3f | %.3f | %s |\n' "$tool" "${MEDIAN[$scenario/$tool]}" \
				"${MIN[$scenario/$tool]}" "${MAX[$scenario/$tool]}" "${CPU[$scenario/$tool]}" \
				"${RSS[$scenario/$tool]}"
		done
		echo
		if [[ $scenario == tree ]]; then
			echo "- rsync ÷ relsync: $(ratio "$scenario/rsync" "$scenario/relsync") (target ≥ 5)"
			echo "- relsync ÷ cp -al: $(ratio "$scenario/relsync" "$scenario/cpal") (target ≤ 1.5); median of the rounds' own ratios: ${PAIRED[$scenario]:-n/a}"
			echo "- rsync ÷ cp -al: $(ratio "$scenario/rsync" "$scenario/cpal")"
		else
			echo "- rsync ÷ relsync: $(ratio "$scenario/rsync" "$scenario/relsync") (target > 1)"
			echo "- relsync peak RSS: ${RSS[$scenario/relsync]:-n/a} MiB (target ≤ 128)"
		fi
	done
}
[[ -z $RESULTS_DIR ]] || mkdir -p "$RESULTS_DIR"
report | tee ${RESULTS_DIR:+"$RESULTS_DIR/report.md"}
