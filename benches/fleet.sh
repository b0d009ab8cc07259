#!/usr/bin/env bash
# Fleet benchmark: `relsync push --fleet` against one rsync per node, on an emulated fleet.
#
# The fleet: a hub namespace with a bridge, a source namespace whose uplink is shaped to
# SOURCE_RATE (tc tbf, default 1gbit), and N node namespaces, each link shaped to NODE_RATE, each
# node running relsyncd (own root on tmpfs) and an rsync daemon. Addresses are in 198.18.0.0/24,
# the benchmarking range, inside those namespaces only. For each N in NODES and each scenario:
#
#   initial  empty nodes receive release A (15k files, 110 MB);
#   patch    nodes holding A receive release B.
#
# Tools: relsync (`relsync push SRC --fleet FILE`, client in the source namespace: stage
# everywhere, then activate in one wave) and rsync (one `rsync -rlpgoD -c -z --delete
# [--link-dest=../a]` per node, all started at once, into a new release directory). Measured per
# run: wall time until the last node is done, bytes sent by the source (its veth counter), CPU
# seconds of the client side and of all node daemons. Reported: median, min, max over RUNS (>= 3).
# With RELAY=K, relsync pushes through a relay tree (`--relay --fanout K`: the source sends to K
# nodes, each forwards to K more) instead of to every node directly; SOURCE_FANOUT=R makes the
# source send to R nodes only (`--source-fanout R`).
# Needs root and tmpfs. Tears everything down on exit, also on failure.
set -euo pipefail

RUNS="${RUNS:-3}"
NODES="${NODES:-4 8 16}"
FLEET_SCENARIOS="${FLEET_SCENARIOS:-patch initial}"
SOURCE_RATE="${SOURCE_RATE:-1gbit}"
NODE_RATE="${NODE_RATE:-1gbit}"
SEED="${SEED:-1}"
FILES="${FILES:-15000}"
BYTES="${BYTES:-110MB}"
SHM="${SHM:-/dev/shm}"
RESULTS_DIR="${RESULTS_DIR:-}"
CORPUS="${CORPUS:-}"
RELAY="${RELAY:-}"
SOURCE_FANOUT="${SOURCE_FANOUT:-}"
TAG="rfb$$"
PORT=7171
RSYNC_PORT=873

die() {
	echo "fleet-bench: $*" >&2
	exit 2
}
log() { echo "== $*" >&2; }

[[ $EUID -eq 0 ]] || die "needs root for network namespaces"
[[ $(stat -f -c %T "$SHM") == tmpfs ]] || die "$SHM is not tmpfs: mount one or set SHM"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS=$RUNS is not a positive number"
((RUNS >= 3)) || log "warning: RUNS=$RUNS; report medians of at least 3"
[[ -z $RELAY || $RELAY =~ ^[1-9][0-9]*$ ]] || die "RELAY=$RELAY is not a fan-out (a positive number)"
[[ -z $SOURCE_FANOUT || ( -n $RELAY && $SOURCE_FANOUT =~ ^[1-9][0-9]*$ ) ]] ||
	die "SOURCE_FANOUT=$SOURCE_FANOUT needs RELAY and a positive number"
max_nodes=0
for n in $NODES; do
	[[ $n =~ ^[1-9][0-9]*$ ]] && ((n <= 200)) || die "NODES: $n is not a node count from 1 to 200"
	((n > max_nodes)) && max_nodes=$n
done
for s in $FLEET_SCENARIOS; do
	[[ $s == patch || $s == initial ]] || die "unknown scenario '$s': use patch and/or initial"
done
for tool in ip tc jq rsync zstd tar /usr/bin/time; do
	command -v "$tool" >/dev/null || die "$tool is missing (Debian packages iproute2, jq, rsync, zstd, tar, time)"
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z ${BIN_DIR:-} ]]; then
	log "building relsync, relsyncd, relsync-testdata and quic-baseline in release mode"
	(cd "$REPO" && cargo build --release --quiet -p sync-cli -p sync-server -p relsync-testdata \
		-p relsync-benches --bin relsync --bin relsyncd --bin relsync-testdata --bin quic-baseline)
	BIN_DIR="$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release"
fi
RELSYNC="$BIN_DIR/relsync"

WORK="$(mktemp -d "$SHM/relsync-fleet.XXXXXX")"
declare -a DAEMONS=()
cleanup() {
	for pid in "${DAEMONS[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	for ns in $(ip netns list | awk '{print $1}' | grep "^$TAG-" || true); do
		ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
		ip netns del "$ns" 2>/dev/null || true
	done
	[[ -n ${KEEP_WORK:-} ]] || rm -rf -- "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

in_ns() { ip netns exec "$TAG-$1" "${@:2}"; }
node_ip() { echo "198.18.0.$((10 + $1))"; }

# The fabric for the largest N; smaller runs use the first N nodes.
log "building a fleet of $max_nodes nodes (source uplink $SOURCE_RATE, node links $NODE_RATE)"
ip netns add "$TAG-hub"
in_ns hub ip link add br0 type bridge
in_ns hub ip link set br0 up
in_ns hub ip link set lo up
attach() { # namespace address rate(shaped on the side given by $4: inside|hub)
	local ns=$1 addr=$2 rate=$3 side=$4 hub_if="h-${1##*-}"
	ip netns add "$TAG-$ns"
	ip link add "$TAG-x" type veth peer name "$TAG-y"
	ip link set "$TAG-x" netns "$TAG-$ns"
	ip link set "$TAG-y" netns "$TAG-hub"
	in_ns "$ns" ip link set "$TAG-x" name eth0
	in_ns hub ip link set "$TAG-y" name "$hub_if"
	in_ns "$ns" ip addr add "$addr/24" dev eth0
	in_ns "$ns" ip link set eth0 up
	in_ns "$ns" ip link set lo up
	in_ns hub ip link set "$hub_if" master br0 up
	if [[ $side == inside ]]; then
		in_ns "$ns" tc qdisc add dev eth0 root tbf rate "$rate" burst 256kb latency 50ms
	else
		in_ns hub tc qdisc add dev "$hub_if" root tbf rate "$rate" burst 256kb latency 50ms
	fi
	for dir in rmem_max wmem_max; do
		in_ns "$ns" sysctl -qw "net.core.$dir=8388608" 2>/dev/null || true
	done
}
attach src 198.18.0.1 "$SOURCE_RATE" inside
for i in $(seq "$max_nodes"); do
	attach "n$i" "$(node_ip "$i")" "$NODE_RATE" hub
done

export RELSYNC_CONFIG_DIR="$WORK/client"
keygen() { "$RELSYNC" keygen --dir "$1" --name "$2" | awk '$1 == "fingerprint" { print $2 }'; }
CLIENT_FP="$(keygen "$WORK/client" id)"
DAEMON_FP="$(keygen "$WORK/daemon" daemon)"

log "starting relsyncd and an rsync daemon on every node"
# The runs put the nodes back by hand and follow each other at once, so no node is ever idle long
# enough to prestage the next release's tree; prestaging is off rather than left to run into the
# next run's time. Every build here makes all of its directories and links (benches/push.sh
# measures a node that did prestage).
for i in $(seq "$max_nodes"); do
	d="$WORK/node$i"
	mkdir -p "$d/app" "$d/rsync"
	cat >"$d/relsyncd.toml" <<-EOF
		listen = "$(node_ip "$i"):$PORT"
		key = "$WORK/daemon/daemon.key"
		cert = "$WORK/daemon/daemon.crt"
		[apps.app]
		root = "$d/app"
		keep = 5
		authorized_keys = ["$CLIENT_FP"]
		accept_relayed = $([[ -n $RELAY ]] && echo true || echo false)
		prestage = false
	EOF
	ip netns exec "$TAG-n$i" env RUST_LOG=warn "$BIN_DIR/relsyncd" --config "$d/relsyncd.toml" \
		2>"$d/relsyncd.log" &
	DAEMONS+=($!)
	cat >"$d/rsyncd.conf" <<-EOF
		pid file = $d/rsyncd.pid
		use chroot = no
		munge symlinks = no
		uid = root
		gid = root
		[node]
		path = $d/rsync
		read only = false
	EOF
	ip netns exec "$TAG-n$i" rsync --daemon --no-detach --address="$(node_ip "$i")" \
		--port="$RSYNC_PORT" --config="$d/rsyncd.conf" --log-file="$d/rsyncd.log" &
	DAEMONS+=($!)
done
for i in $(seq "$max_nodes"); do
	for _ in $(seq 200); do
		in_ns "n$i" ss -uln | grep -q ":$PORT " && in_ns "n$i" ss -tln | grep -q ":$RSYNC_PORT " && break
		sleep 0.05
	done
done

fleet_file() { # N
	local f="$WORK/fleet-$1.toml" i
	: >"$f"
	for i in $(seq "$1"); do
		printf '[hosts.n%d]\naddress = "%s:%d"\nkey = "%s"\n\n' "$i" "$(node_ip "$i")" "$PORT" "$DAEMON_FP" >>"$f"
	done
	printf '[groups.all]\nhosts = [%s]\napp = "app"\nwaves = "100%%"\n' \
		"$(seq "$1" | sed 's/^/"n/; s/$/"/' | paste -sd, -)" >>"$f"
	echo "$f"
}

src_tx() { in_ns src cat /sys/class/net/eth0/statistics/tx_bytes; }
cpu_of() {
	awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13 + $14 + $15) / hz }' "/proc/$1/stat"
}
daemons_cpu() { # N: relsyncd and rsync daemons of the first N nodes
	local total=0 pid
	for pid in "${DAEMONS[@]:0:$((2 * $1))}"; do
		total=$(awk -v a="$total" -v b="$(cpu_of "$pid")" 'BEGIN { print a + b }')
	done
	echo "$total"
}

# One timed run of "$@" in the source namespace; appends a JSON line to $1. $2 is N.
timed() {
	local out=$1 n=$2
	shift 2
	local tx0 d0 t0 t1
	sleep 0.3
	tx0=$(src_tx) d0=$(daemons_cpu "$n")
	t0=$(date +%s%N)
	/usr/bin/time -f '%U %S' -o "$WORK/time" ip netns exec "$TAG-src" "$@" \
		>"$WORK/client.out" 2>"$WORK/client.err" || die "client failed: $* : $(tail -5 "$WORK/client.err")"
	t1=$(date +%s%N)
	sleep 0.5
	jq -nc --argjson s "$(awk -v n=$((t1 - t0)) 'BEGIN { print n / 1e9 }')" \
		--argjson tx "$(($(src_tx) - tx0))" \
		--argjson ccpu "$(awk '{ print $1 + $2 }' "$WORK/time")" \
		--argjson dcpu "$(awk -v a="$d0" -v b="$(daemons_cpu "$n")" 'BEGIN { print b - a }')" \
		'{seconds: $s, source_bytes: $tx, client_cpu: $ccpu, daemons_cpu: $dcpu}' >>"$out"
}

# rsync to every node at once; the client side runs in the source namespace.
rsync_all() { # N dest-subdir link-dest|- source
	local n=$1 dest=$2 link=$3 src=$4 i pids=()
	for i in $(seq "$n"); do
		if [[ $link == - ]]; then
			rsync -rlpgoD -c -z --delete "$src/" "rsync://$(node_ip "$i"):$RSYNC_PORT/node/$dest/" &
		else
			rsync -rlpgoD -c -z --delete --link-dest="$link" "$src/" \
				"rsync://$(node_ip "$i"):$RSYNC_PORT/node/$dest/" &
		fi
		pids+=($!)
	done
	local failed=0
	for p in "${pids[@]}"; do wait "$p" || failed=1; done
	return $failed
}
export -f rsync_all node_ip
export RSYNC_PORT

# Puts relsync's nodes back to "holds $2" (or empty with -) by removing release $1 (daemons keep
# running; nothing is connected meanwhile).
relsync_reset() { # N release previous|-
	local i d
	for i in $(seq "$1"); do
		d="$WORK/node$i/app"
		rm -rf "$d/releases/$2" "$d/.relsync/releases/$2.rec" "$d/.relsync/objects"
		if [[ $3 == - ]]; then rm -f "$d/current"; else ln -sfn "releases/$3" "$d/current"; fi
	done
}

# Checks that a node's copy equals a corpus tree: paths, types, modes, symlink targets, contents.
tree_digest() {
	(cd "$1" && find . -mindepth 1 -printf '%p %y %m %l\n' | LC_ALL=C sort &&
		find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha1sum)
}
same_tree() { # source copy what
	diff -q <(tree_digest "$1") <(tree_digest "$2") >/dev/null || die "$3: $2 differs from $1"
}

declare -A RESULT
summarize() { # key jsonl
	RESULT[$1]=$(jq -s '
		def med: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
		{ runs: length, median: (map(.seconds) | med), min: (map(.seconds) | min),
		  max: (map(.seconds) | max), source_bytes: (map(.source_bytes) | med | floor),
		  client_cpu: (map(.client_cpu) | med), daemons_cpu: (map(.daemons_cpu) | med) }' "$2")
	[[ -z $RESULTS_DIR ]] || { mkdir -p "$RESULTS_DIR" && cp "$2" "$RESULTS_DIR/$1.jsonl"; }
}

if [[ -n $CORPUS ]]; then
	[[ -d $CORPUS/a && -d $CORPUS/b ]] || die "CORPUS=$CORPUS holds no a/ and b/ from relsync-testdata"
	log "using the release pair in $CORPUS"
	A="$CORPUS/a" B="$CORPUS/b"
else
	log "generating the release pair (seed $SEED, $FILES files, $BYTES)"
	"$BIN_DIR/relsync-testdata" --seed "$SEED" --files "$FILES" --bytes "$BYTES" "$WORK/corpus" >&2
	A="$WORK/corpus/a" B="$WORK/corpus/b"
fi

# The CPU floor: the least work the nodes of this design must do, measured on this machine. Every
# node shares the same cores here (a real fleet gives each its own), so no build of relsync can
# finish before F(N) = (source + N * node) / CPUs. Per node: for the patch, hard-linking the tree
# (`cp -al`); for the initial push, taking one compressed copy of the tree off a bare QUIC stream
# (both ends' CPU: each node receives it once, and the source or a relay sends it), decompressing it
# (`zstd -d` of the tree's tar at relsync's level 3, one stream: cheaper than per-file frames) and
# writing it out (`tar -x`). The source compresses it once (`zstd -3`). Hashing, verifying, syncing
# and everything else relsync does come on top, so F(N) is a lower bound; rsync's time over F(N) is
# the most any build could show here.
cpu_s() { # median CPU seconds (user + system) of 5 runs of "$@"; $WORK/floor/reset runs before each
	local i
	for i in 1 2 3 4 5; do
		bash "$WORK/floor/reset"
		/usr/bin/time -f '%U %S' -o "$WORK/floor/time" "$@" >/dev/null
		awk '{ print $1 + $2 }' "$WORK/floor/time"
	done | sort -n | sed -n 3p
}
log "measuring the CPU floor of one node's work"
mkdir -p "$WORK/floor"
tar -C "$A" -cf "$WORK/floor/a.tar" .
zstd -q -3 -f "$WORK/floor/a.tar" -o "$WORK/floor/a.tar.zst"
echo "rm -rf '$WORK/floor/x'" >"$WORK/floor/reset"
FLOOR_LINK=$(cpu_s cp -al "$A" "$WORK/floor/x")
echo "rm -rf '$WORK/floor/x' && mkdir '$WORK/floor/x'" >"$WORK/floor/reset"
FLOOR_WRITE=$(cpu_s tar -C "$WORK/floor/x" -xf "$WORK/floor/a.tar")
: >"$WORK/floor/reset"
FLOOR_UNZSTD=$(cpu_s zstd -q -d -c "$WORK/floor/a.tar.zst")
FLOOR_ZSTD=$(cpu_s zstd -q -3 -c "$WORK/floor/a.tar")
rm -rf "$WORK/floor/x" "$WORK/floor/a.tar"
FLOOR_QUIC=0
if [[ -x $BIN_DIR/quic-baseline ]]; then
	in_ns n1 "$BIN_DIR/quic-baseline" server --listen "$(node_ip 1):7272" --key "$WORK/daemon/daemon.key" \
		--cert "$WORK/daemon/daemon.crt" --authorize "$CLIENT_FP" 2>"$WORK/floor/quic.log" &
	quic_pid=$!
	DAEMONS+=("$quic_pid")
	for _ in $(seq 100); do
		in_ns n1 ss -uln | grep -q ":7272 " && break
		sleep 0.05
	done
	FLOOR_QUIC=$(for _ in 1 2 3 4 5; do
		s0=$(cpu_of "$quic_pid")
		/usr/bin/time -f '%U %S' -o "$WORK/floor/time" ip netns exec "$TAG-src" "$BIN_DIR/quic-baseline" client \
			--connect "$(node_ip 1):7272" --key "$WORK/client/id.key" --cert "$WORK/client/id.crt" \
			--pin "$DAEMON_FP" --bytes "$(stat -c %s "$WORK/floor/a.tar.zst")" >/dev/null 2>&1 ||
			die "quic-baseline failed: $(tail -3 "$WORK/floor/quic.log")"
		sleep 0.2
		awk -v a="$s0" -v b="$(cpu_of "$quic_pid")" '{ print $1 + $2 + b - a }' "$WORK/floor/time"
	done | sort -n | sed -n 3p)
	kill "$quic_pid" 2>/dev/null || true
	wait "$quic_pid" 2>/dev/null || true
	unset 'DAEMONS[-1]'
else
	log "no quic-baseline in $BIN_DIR: the initial floor leaves out the transport"
fi
rm -f "$WORK/floor/a.tar.zst"
# F(N) for a scenario: the source's share plus N nodes' on the machine's CPUs.
floor() { # scenario N
	if [[ $1 == patch ]]; then
		awk -v n="$2" -v c="$(nproc)" -v l="$FLOOR_LINK" 'BEGIN { print n * l / c }'
	else
		awk -v n="$2" -v c="$(nproc)" -v z="$FLOOR_ZSTD" -v d="$FLOOR_UNZSTD" -v w="$FLOOR_WRITE" \
			-v q="$FLOOR_QUIC" 'BEGIN { print (z + n * (q + d + w)) / c }'
	fi
}

for n in $NODES; do
	fleet=$(fleet_file "$n")
	if [[ -n $RELAY ]]; then spread=(--relay --fanout "$RELAY" ${SOURCE_FANOUT:+--source-fanout "$SOURCE_FANOUT"}); else spread=(--fanout "$n"); fi
	push() { # source release
		timed "$WORK/$key.jsonl" "$n" env RELSYNC_CONFIG_DIR="$WORK/client" RELSYNC_CACHE_DIR="$WORK/cache" \
			"$RELSYNC" push "$1" --fleet "$fleet" --release-id "$2" "${spread[@]}"
	}
	for scenario in $FLEET_SCENARIOS; do
		key="$scenario-relsync-$n"
		log "$key: $RUNS runs"
		relsync_reset "$n" b -
		relsync_reset "$n" a -
		rm -rf "$WORK/cache" "$WORK/cache-a"
		if [[ $scenario == patch ]]; then
			# Every node holds A, pushed by this client, whose cache then knows it.
			ip netns exec "$TAG-src" env RELSYNC_CACHE_DIR="$WORK/cache" \
				"$RELSYNC" push "$A" --fleet "$fleet" --release-id a "${spread[@]}" >/dev/null
			cp -a "$WORK/cache" "$WORK/cache-a"
		fi
		for _ in $(seq "$RUNS"); do
			rm -rf "$WORK/cache"
			if [[ $scenario == initial ]]; then
				relsync_reset "$n" a -
				push "$A" a
			else
				relsync_reset "$n" b a
				cp -a "$WORK/cache-a" "$WORK/cache"
				push "$B" b
			fi
		done
		if [[ $scenario == initial ]]; then
			same_tree "$A" "$WORK/node$n/app/releases/a" "$key"
		else
			same_tree "$B" "$WORK/node$n/app/releases/b" "$key"
		fi
		summarize "$key" "$WORK/$key.jsonl"

		key="$scenario-rsync-$n"
		log "$key: $RUNS runs"
		for _ in $(seq "$RUNS"); do
			for i in $(seq "$n"); do
				rm -rf "$WORK/node$i/rsync/releases"
				mkdir -p "$WORK/node$i/rsync/releases"
				[[ $scenario == patch ]] && cp -a "$A" "$WORK/node$i/rsync/releases/a"
			done
			if [[ $scenario == initial ]]; then
				timed "$WORK/$key.jsonl" "$n" bash -c "rsync_all $n releases/a - '$A'"
			else
				timed "$WORK/$key.jsonl" "$n" bash -c "rsync_all $n releases/b ../a '$B'"
			fi
		done
		if [[ $scenario == initial ]]; then
			same_tree "$A" "$WORK/node$n/rsync/releases/a" "$key"
		else
			same_tree "$B" "$WORK/node$n/rsync/releases/b" "$key"
		fi
		summarize "$key" "$WORK/$key.jsonl"
	done
done

field() { jq -r ".$2" <<<"${RESULT[$1]}"; }
report() {
	local scenario n
	echo
	echo "# Fleet push, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, source uplink $SOURCE_RATE, node links $NODE_RATE, $RUNS runs each, relsync $([[ -n $RELAY ]] && echo "through a relay tree of fan-out $RELAY${SOURCE_FANOUT:+ (the source sends to $SOURCE_FANOUT)}" || echo "direct to every node")"
	echo
	printf 'One node'"'"'s floor work, CPU s (median of 5): cp -al %s; tar -x %s; zstd -d %s; bare QUIC stream of the compressed tree, both ends %s; the source'"'"'s zstd -3 %s\n' \
		"$FLOOR_LINK" "$FLOOR_WRITE" "$FLOOR_UNZSTD" "$FLOOR_QUIC" "$FLOOR_ZSTD"
	for scenario in $FLEET_SCENARIOS; do
		echo
		echo "## $scenario ($([[ $scenario == patch ]] && echo "nodes hold A, push B" || echo "empty nodes, push A"))"
		echo
		echo "| N | tool | median s | min s | max s | source bytes | client CPU s | node daemons CPU s |"
		echo "|---:|---|---:|---:|---:|---:|---:|---:|"
		for n in $NODES; do
			for tool in relsync rsync; do
				local k="$scenario-$tool-$n"
				[[ -n ${RESULT[$k]:-} ]] || continue
				printf '| %s | %s | %.3f | %.3f | %.3f | %s | %.2f | %.2f |\n' "$n" "$tool" \
					"$(field "$k" median)" "$(field "$k" min)" "$(field "$k" max)" \
					"$(field "$k" source_bytes)" "$(field "$k" client_cpu)" "$(field "$k" daemons_cpu)"
			done
		done
		echo
		for n in $NODES; do
			printf -- '- N = %s: rsync ÷ relsync %.2f×\n' "$n" \
				"$(awk -v a="$(field "$scenario-rsync-$n" median)" -v b="$(field "$scenario-relsync-$n" median)" 'BEGIN { print a / b }')"
		done
		local first last
		first=$(echo "$NODES" | awk '{ print $1 }') last=$(echo "$NODES" | awk '{ print $NF }')
		printf -- '- relsync time from N = %s to N = %s: %+.0f%%\n' "$first" "$last" \
			"$(awk -v a="$(field "$scenario-relsync-$first" median)" -v b="$(field "$scenario-relsync-$last" median)" 'BEGIN { print 100 * (b / a - 1) }')"
		echo
		echo "CPU floor F(N) on these $(nproc) CPUs (the least time any build could take here, see fleet.sh):"
		echo
		for n in $NODES; do
			printf -- '- N = %s: F = %.3f s; rsync ÷ F %.2f×; relsync ÷ F %.2f\n' "$n" "$(floor "$scenario" "$n")" \
				"$(awk -v a="$(field "$scenario-rsync-$n" median)" -v f="$(floor "$scenario" "$n")" 'BEGIN { print a / f }')" \
				"$(awk -v a="$(field "$scenario-relsync-$n" median)" -v f="$(floor "$scenario" "$n")" 'BEGIN { print a / f }')"
		done
		printf -- '- F from N = %s to N = %s: %+.0f%%\n' "$first" "$last" \
			"$(awk -v a="$(floor "$scenario" "$first")" -v b="$(floor "$scenario" "$last")" 'BEGIN { print 100 * (b / a - 1) }')"
	done
}
# The common summary benches/suite.sh collects: one RESULTS_DIR/fleet-SCENARIO-N.summary.json per
# scenario and fleet size (read by suite-report); wire bytes are the bytes the source sent.
summaries() {
	local scenario n tool what
	for scenario in $FLEET_SCENARIOS; do
		[[ $scenario == patch ]] && what="push B to N nodes holding A" || what="push A to N empty nodes"
		for n in $NODES; do
			for tool in relsync rsync; do
				jq -c --arg name "$([[ $tool == rsync ]] && echo "rsync, one per node" || echo relsync)" \
					'{name: $name, runs, median_s: .median, min_s: .min, max_s: .max, wire_bytes: .source_bytes}' \
					<<<"${RESULT[$scenario-$tool-$n]}"
			done | jq -s --arg s "fleet-$scenario-$n" --arg g "fleet-$scenario" \
				--arg t "fleet $scenario: ${what/N/$n} (source uplink $SOURCE_RATE)" --argjson n "$n" \
				'{scenario: $s, group: $g, title: $t, cold: false,
				  cache_note: "tmpfs: corpus and nodes in memory, no page cache to drop",
				  nodes: $n, tools: .}' >"$RESULTS_DIR/fleet-$scenario-$n.summary.json"
		done
	done
}

[[ -z $RESULTS_DIR ]] || { mkdir -p "$RESULTS_DIR" && summaries; }
report | tee ${RESULTS_DIR:+"$RESULTS_DIR/fleet-report.md"}
