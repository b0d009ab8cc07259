#!/usr/bin/env bash
# Push benchmark: relsync push vs the rsync daemon, over a veth link into a network namespace.
#
# Scenarios (PUSH_SCENARIOS):
#   patch  the node holds release A; push release B of the generated pair (15k files, 110 MB).
#          Tools: relsync push of B's own directory (a fresh checkout: every file read and hashed);
#          relsync push from a working copy that held A and was brought to B in place (the hash
#          cache spares reading unchanged files); rsync daemon with -rlpgoD -c -z --delete
#          --link-dest (a new release directory, like relsync); plain rsync -az --delete into a
#          directory holding A.
#   bulk   an empty node; push BULK_FILES incompressible files totalling BULK_SIZE (1 GiB).
#          Tools: relsync push; quic-baseline (one bare QUIC stream, same quinn, TLS and
#          transport tuning as relsync, no files).
#   small  an initial sync of a tree of many small files (SMALL_SRC, or SMALL_FILES generated
#          files totalling SMALL_BYTES) into an empty directory on the node. Tools: `relsync sync
#          SRC/ relsync://NODE/EXPORT/` and `rsync -a SRC/ rsync://NODE/MODULE/`. A SMALL_SRC on
#          disk is read cold: the page cache is dropped before each run.
#
# Every run starts from the same state (the run's release removed from the node, the client cache
# restored; relsyncd keeps running, as on a real node). Measured per run: wall time of the client
# command, bytes on the link each way (veth counters, so packet headers included for both tools), CPU seconds of the client
# and of the daemon (relsyncd: its own; rsync: the daemon's reaped children), and relsyncd's peak
# RSS (VmHWM). Reported: median, min, max over RUNS (>= 5). Needs root (netns, veth) and tmpfs.
set -euo pipefail

RUNS="${RUNS:-5}"
PUSH_SCENARIOS="${PUSH_SCENARIOS:-patch bulk}"
SEED="${SEED:-1}"
FILES="${FILES:-15000}"
BYTES="${BYTES:-110MB}"
BULK_SIZE_MIB="${BULK_SIZE_MIB:-1024}"
BULK_FILES="${BULK_FILES:-8}"
SHM="${SHM:-/dev/shm}"
RESULTS_DIR="${RESULTS_DIR:-}"
CORPUS="${CORPUS:-}"
SMALL_SRC="${SMALL_SRC:-}"
SMALL_FILES="${SMALL_FILES:-100000}"
SMALL_BYTES="${SMALL_BYTES:-200MB}"
NS="relsync-bench-$$"
VETH_H="rsb$$h"
VETH_N="rsb$$n"
HOST_IP=10.231.0.1
NODE_IP=10.231.0.2
PORT=7171
PORT_WC=7173
RSYNC_PORT=8730
QUIC_PORT=7272

die() {
	echo "push-bench: $*" >&2
	exit 2
}
log() { echo "== $*" >&2; }

[[ $(uname -s) == Linux ]] || die "needs Linux network namespaces; this is $(uname -s)"
[[ $EUID -eq 0 ]] || die "needs root to create a network namespace and a veth pair"
[[ $(stat -f -c %T "$SHM") == tmpfs ]] || die "$SHM is not tmpfs: mount one or set SHM"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS=$RUNS is not a positive number"
((RUNS >= 5)) || log "warning: RUNS=$RUNS; report medians of at least 5 runs"
for s in $PUSH_SCENARIOS; do
	[[ $s == patch || $s == bulk || $s == small ]] ||
		die "unknown scenario '$s' in PUSH_SCENARIOS: use patch, bulk and/or small"
done

need() {
	command -v "$1" >/dev/null && return
	log "installing Debian package $2"
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
	command -v "$1" >/dev/null || die "$1 is still missing after installing $2"
}
need jq jq
need /usr/bin/time time
need rsync rsync
need ip iproute2

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z ${BIN_DIR:-} ]]; then
	command -v cargo >/dev/null || die "cargo not found: install Rust or set BIN_DIR"
	log "building relsync, relsyncd, relsync-testdata and quic-baseline in release mode"
	(cd "$REPO" && cargo build --release --quiet -p sync-cli -p sync-server -p relsync-testdata \
		-p relsync-benches --bin relsync --bin relsyncd --bin relsync-testdata --bin quic-baseline)
	BIN_DIR="$(cd "$REPO" && cargo metadata --format-version 1 --no-deps | jq -r .target_directory)/release"
fi
for b in relsync relsyncd relsync-testdata quic-baseline; do
	[[ -x $BIN_DIR/$b ]] || die "$b not found in $BIN_DIR: build it or set BIN_DIR"
done
RELSYNC="$BIN_DIR/relsync"

WORK="$(mktemp -d "$SHM/relsync-push.XXXXXX")"
DAEMON_PID=""
cleanup() {
	[[ -z $DAEMON_PID ]] || kill "$DAEMON_PID" 2>/dev/null || true
	ip netns pids "$NS" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
	ip link del "$VETH_H" 2>/dev/null || true
	ip netns del "$NS" 2>/dev/null || true
	[[ -n ${KEEP_WORK:-} ]] || rm -rf -- "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The link: a veth pair, the node's end in its own namespace. No shaping: the figures say how fast
# each tool is when the link is not the limit (loopback-class, about 10+ Gbit/s).
ip netns add "$NS"
ip link add "$VETH_H" type veth peer name "$VETH_N"
ip link set "$VETH_N" netns "$NS"
ip addr add "$HOST_IP/24" dev "$VETH_H"
ip link set "$VETH_H" up
ip -n "$NS" addr add "$NODE_IP/24" dev "$VETH_N"
ip -n "$NS" link set "$VETH_N" up
ip -n "$NS" link set lo up
# relsync asks for 4 MiB UDP buffers; let the kernel grant them (both namespaces).
for ns in "" "ip netns exec $NS"; do
	$ns sysctl -qw net.core.rmem_max=8388608 net.core.wmem_max=8388608 2>/dev/null || true
done
inns() { ip netns exec "$NS" "$@"; }

tx() { cat "/sys/class/net/$VETH_H/statistics/tx_bytes"; }
rx() { cat "/sys/class/net/$VETH_H/statistics/rx_bytes"; }
# CPU seconds of a process and of its reaped children (fields 14-17 of /proc/PID/stat).
cpu_of() {
	awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13 + $14 + $15) / hz }' "/proc/$1/stat"
}

# Keys: one client, one daemon; the daemon authorizes the client, the client pins the daemon.
export RELSYNC_CONFIG_DIR="$WORK/client"
keygen() { "$RELSYNC" keygen --dir "$1" --name "$2" | awk '$1 == "fingerprint" { print $2 }'; }
CLIENT_FP="$(keygen "$WORK/client" id)"
DAEMON_FP="$(keygen "$WORK/daemon" daemon)"
[[ -n $CLIENT_FP && -n $DAEMON_FP ]] || die "cannot read the key fingerprints"
"$RELSYNC" trust "$NODE_IP:$PORT" "$DAEMON_FP" >/dev/null
"$RELSYNC" trust "$NODE_IP:$PORT_WC" "$DAEMON_FP" >/dev/null

start_relsyncd() { # root [export-dir] [port]
	local port=${3:-$PORT}
	cat >"$WORK/relsyncd-$port.toml" <<-EOF
		listen = "$NODE_IP:$port"
		key = "$WORK/daemon/daemon.key"
		cert = "$WORK/daemon/daemon.crt"
		[apps.app]
		root = "$1"
		authorized_keys = ["$CLIENT_FP"]
	EOF
	if [[ -n ${2:-} ]]; then
		printf '[exports.small]\npath = "%s"\nauthorized_keys = ["%s"]\n' "$2" "$CLIENT_FP" >>"$WORK/relsyncd-$port.toml"
	fi
	ip netns exec "$NS" env RUST_LOG=warn "$BIN_DIR/relsyncd" --config "$WORK/relsyncd-$port.toml" 2>>"$WORK/relsyncd.log" &
	DAEMON_PID=$!
	for _ in $(seq 100); do
		inns ss -uln | grep -q ":$port " && return
		sleep 0.05
	done
	die "relsyncd did not start listening; see its log: $(tail -5 "$WORK/relsyncd.log")"
}
stop_daemon() {
	[[ -n $DAEMON_PID ]] || return 0
	kill "$DAEMON_PID" 2>/dev/null || true
	wait "$DAEMON_PID" 2>/dev/null || true
	DAEMON_PID=""
}

# Background jobs are started with `ip netns exec` directly (not through a shell function) so
# that $! is the daemon itself.

# Set by the small scenario when its source is on disk: every run then reads it cold.
DROP_CACHES=""

# One timed run of "$@" (the client); the daemon is $DAEMON_PID. Appends a JSON line to $1.
timed() {
	local out=$1
	shift
	local tx0 rx0 d0 t0 t1 d1 hwm
	if [[ -n $DROP_CACHES ]]; then
		sync
		echo 3 >/proc/sys/vm/drop_caches
	fi
	sleep 0.2
	tx0=$(tx) rx0=$(rx) d0=$(cpu_of "$DAEMON_PID")
	t0=$(date +%s%N)
	/usr/bin/time -f '%U %S' -o "$WORK/time" "$@" >"$WORK/client.out" 2>"$WORK/client.err" ||
		die "client failed: $* : $(tail -5 "$WORK/client.err")"
	t1=$(date +%s%N)
	sleep 0.3 # let a forking daemon reap its child so its CPU shows up
	d1=$(cpu_of "$DAEMON_PID")
	hwm=$(awk '/VmHWM/ { print $2 }' "/proc/$DAEMON_PID/status")
	jq -nc --argjson s "$(awk -v n=$((t1 - t0)) 'BEGIN { print n / 1e9 }')" \
		--argjson up "$(($(tx) - tx0))" --argjson down "$(($(rx) - rx0))" \
		--argjson ccpu "$(awk '{ print $1 + $2 }' "$WORK/time")" \
		--argjson dcpu "$(awk -v a="$d0" -v b="$d1" 'BEGIN { print b - a }')" \
		--argjson rss "$(awk -v k="${hwm:-0}" 'BEGIN { print k / 1024 }')" \
		'{seconds: $s, bytes_up: $up, bytes_down: $down, client_cpu: $ccpu, daemon_cpu: $dcpu, daemon_rss_mib: $rss}' >>"$out"
}

# Checks that a directory on the node equals a corpus tree: paths, types, modes, symlink
# targets and file contents (not mtimes, which the tools treat differently).
tree_digest() {
	(cd "$1" && find . -mindepth 1 -printf '%p %y %m %l\n' | LC_ALL=C sort &&
		find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha1sum)
}
same_tree() {
	local diffs
	diffs=$(diff <(tree_digest "$1") <(tree_digest "$2") | head -5) ||
		die "$3: the node's copy differs from the source:
$diffs"
}

declare -A RESULT

summarize() { # key jsonl
	RESULT[$1]=$(jq -s '
		def med: sort | if length % 2 == 1 then .[length / 2 | floor] else (.[length / 2 - 1] + .[length / 2]) / 2 end;
		{ runs: length,
		  median: (map(.seconds) | med), min: (map(.seconds) | min), max: (map(.seconds) | max),
		  bytes_up: (map(.bytes_up) | med | floor), bytes_down: (map(.bytes_down) | med | floor),
		  client_cpu: (map(.client_cpu) | med), daemon_cpu: (map(.daemon_cpu) | med),
		  daemon_rss_mib: (map(.daemon_rss_mib) | max | . * 10 | floor / 10) }' "$2")
	[[ -z $RESULTS_DIR ]] || { mkdir -p "$RESULTS_DIR" && cp "$2" "$RESULTS_DIR/$1.jsonl"; }
}

# The node is put back to "holds the snapshot" after each run by removing what the run added
# (release dir, its record, any leftover objects) and pointing `current` back. relsyncd keeps
# running, as on a real node (it received the snapshot's release itself, so it starts the timed
# runs as warm as after that push); nothing else is connected while the files are put back.
# Copying a saved root instead would give every file a new inode, and relsyncd, which trusts a
# kept file only while it is the inode it recorded, would rightly resend everything.
# The snapshot's release is then activated again through relsyncd, as an operator rolling back
# would, and the run waits until relsyncd has prestaged its tree (`.relsync/next/`), which it
# does whenever the app is idle: a real node gets that time between two releases. relsyncd's CPU
# after a push includes prestaging the release it just built.
wait_prestaged() { # node-root release
	local _
	for _ in $(seq 200); do
		[[ -d $1/.relsync/next/$2 ]] && return
		sleep 0.05
	done
	die "relsyncd did not prestage release $2 in 10 s; see its log: $(tail -5 "$WORK/relsyncd.log")"
}

# One timed push of `source` as `release-id`, then the node put back: the release removed and,
# with a previous release, that one activated again and its tree prestaged; with `-`, no
# `current`. The client cache is restored from `<client-cache>-saved` first, and `prep-script`
# run after that.
relsync_once() { # key source node-root port client-cache release-id previous-release-id|- [prep-script]
	local key=$1 src=$2 node=$3 port=$4 cache=$5 id=$6 prev=$7 prep=${8:-}
	rm -rf "$cache"
	cp -a "$cache-saved" "$cache"
	[[ -z $prep ]] || bash -c "$prep"
	RELSYNC_CACHE_DIR="$cache" timed "$WORK/$key.jsonl" \
		"$RELSYNC" push "$src" "$NODE_IP:$port/app" --release-id "$id"
	same_tree "$src" "$node/releases/$id" "$key"
	rm -rf "$node/releases/$id" "$node/.relsync/releases/$id.rec" "$node/.relsync/objects"
	if [[ $prev == - ]]; then
		rm -f "$node/current"
		return
	fi
	ln -sfn "releases/$prev" "$node/current"
	"$RELSYNC" activate "$NODE_IP:$port/app" "$prev" >/dev/null
	wait_prestaged "$node" "$prev"
}

# RUNS pushes of `source` to an empty node (a relsyncd of its own, stopped afterwards).
relsync_runs() { # key source node-root client-cache release-id
	local key=$1 src=$2 node=$3 cache=$4 id=$5 i
	log "$key: $RUNS runs"
	cp -a "$cache" "$cache-saved"
	start_relsyncd "$node"
	for i in $(seq "$RUNS"); do
		relsync_once "$key" "$src" "$node" "$PORT" "$cache" "$id" -
	done
	stop_daemon
	rm -rf "$cache-saved"
	summarize "$key" "$WORK/$key.jsonl"
}

start_rsyncd() { # module-dir
	cat >"$WORK/rsyncd.conf" <<-EOF
		pid file = $WORK/rsyncd.pid
		use chroot = no
		munge symlinks = no
		uid = root
		gid = root
		[node]
		path = $1
		read only = false
	EOF
	ip netns exec "$NS" rsync --daemon --no-detach --address="$NODE_IP" --port="$RSYNC_PORT" \
		--config="$WORK/rsyncd.conf" --log-file="$WORK/rsyncd.log" &
	DAEMON_PID=$!
	for _ in $(seq 100); do
		inns ss -tln | grep -q ":$RSYNC_PORT " && return
		sleep 0.05
	done
	die "the rsync daemon did not start; see $WORK/rsyncd.log"
}

rsync_runs() { # key source prep-script rsync-args... (destination is relative to the module)
	local key=$1 src=$2 prep=$3 out="$WORK/$1.jsonl" i
	shift 3
	log "$key: $RUNS runs"
	mkdir -p "$WORK/rnode"
	start_rsyncd "$WORK/rnode"
	for i in $(seq "$RUNS"); do
		bash -c "$prep"
		timed "$out" rsync "$@"
	done
	stop_daemon
	summarize "$key" "$out"
}

if [[ " $PUSH_SCENARIOS " == *" patch "* ]]; then
	if [[ -n $CORPUS ]]; then
		[[ -d $CORPUS/a && -d $CORPUS/b ]] || die "CORPUS=$CORPUS holds no a/ and b/ from relsync-testdata"
		log "patch: using the release pair in $CORPUS"
		A="$CORPUS/a" B="$CORPUS/b"
	else
		log "patch: generating the release pair (seed $SEED, $FILES files, $BYTES)"
		"$BIN_DIR/relsync-testdata" --seed "$SEED" --files "$FILES" --bytes "$BYTES" "$WORK/corpus" >&2
		A="$WORK/corpus/a" B="$WORK/corpus/b"
	fi

	# The CPU floor: the least work a push of B to a node holding A must do, by plain tools on
	# this machine (median of 5, CPU seconds): reading every file of B (`tar -c`, which the source
	# must do to hash it; the hashing itself is left out) and hard-linking A's tree (`cp -al`,
	# what the node's new release costs at least). Client and node share the same CPUs here, so
	# no build can take less than F = (read + link) / CPUs.
	cpu_s() { # median CPU seconds of 5 runs of "$@" (stdout to /dev/zero); $WORK/x removed before each
		local i
		for i in 1 2 3 4 5; do
			rm -rf "$WORK/x"
			/usr/bin/time -f '%U %S' -o "$WORK/floor.time" "$@" >/dev/zero
			awk '{ print $1 + $2 }' "$WORK/floor.time"
		done | sort -n | sed -n 3p
	}
	FLOOR_READ=$(cpu_s tar -C "$B" -cf - .)
	FLOOR_LINK=$(cpu_s cp -al "$A" "$WORK/x")
	rm -rf "$WORK/x"

	# The four tools run in turn, run by run (relsync, relsync from a working copy, rsync
	# --link-dest, rsync -az, then again), so that a slow spell of this shared machine slows
	# them alike rather than one tool's whole series; each has its own daemon running throughout
	# (two relsyncd, so that each one's peak RSS is one app's), idle while the others run.
	#
	# relsync: the node got A by a push, and the client kept what it pushed in its cache. From a
	# working copy (the second relsyncd): the deploy host's build directory W held A when A
	# was pushed from it, and has since been brought to B in place, as `git checkout` does: only
	# the files that differ are rewritten (each as a new file renamed over the old one), the rest
	# keep their inode and times. relsync's hash cache then spares reading those; only the
	# changed files are read and hashed. Before each run W is put back to A and then brought to
	# B (`rsync -rlpc`: by content, times left alone); the client cache, hash cache included, is
	# restored to what the push of A left. W is copied from A more than the scanner's racy window
	# (2 s) before that push, as a working copy is older than that between two deploys. rsync -c
	# has no such cache: it reads all of B either way.
	W="$WORK/wc"
	cp -a "$A" "$W"
	sleep 2.1
	mkdir -p "$WORK/node" "$WORK/node-wc" "$WORK/cache" "$WORK/cache-wc"
	start_relsyncd "$WORK/node"
	RELSYNCD_PID=$DAEMON_PID
	start_relsyncd "$WORK/node-wc" "" "$PORT_WC"
	RELSYNCD_WC_PID=$DAEMON_PID
	RELSYNC_CACHE_DIR="$WORK/cache" "$RELSYNC" push "$A" "$NODE_IP:$PORT/app" --release-id a >/dev/null
	RELSYNC_CACHE_DIR="$WORK/cache-wc" "$RELSYNC" push "$W" "$NODE_IP:$PORT_WC/app" --release-id a >/dev/null
	cp -a "$WORK/cache" "$WORK/cache-saved"
	cp -a "$WORK/cache-wc" "$WORK/cache-wc-saved"

	# rsync with --link-dest: a new release directory next to A, like relsync builds. Plain
	# rsync -az --delete: over a directory that holds A (as a previous rsync left it).
	rm -rf "$WORK/rnode"
	mkdir -p "$WORK/rnode/releases"
	rsync -a "$A/" "$WORK/rnode/releases/a/"
	DAEMON_PID=""
	start_rsyncd "$WORK/rnode"
	RSYNCD_PID=$DAEMON_PID

	wait_prestaged "$WORK/node" a
	wait_prestaged "$WORK/node-wc" a
	log "patch: $RUNS rounds of relsync, relsync from a working copy, rsync --link-dest, rsync -az"
	for i in $(seq "$RUNS"); do
		DAEMON_PID=$RELSYNCD_PID
		relsync_once patch-relsync "$B" "$WORK/node" "$PORT" "$WORK/cache" b a
		DAEMON_PID=$RELSYNCD_WC_PID
		relsync_once patch-relsync-wc "$W" "$WORK/node-wc" "$PORT_WC" "$WORK/cache-wc" b a \
			"rsync -rlpc --delete '$A/' '$W/' && rsync -rlpc --delete '$B/' '$W/'"
		DAEMON_PID=$RSYNCD_PID
		rm -rf "$WORK/rnode/releases/b"
		timed "$WORK/patch-rsync-linkdest.jsonl" rsync -rlpgoD -c -z --delete --link-dest=../a \
			"$B/" "rsync://$NODE_IP:$RSYNC_PORT/node/releases/b/"
		same_tree "$B" "$WORK/rnode/releases/b" patch-rsync-linkdest
		rm -rf "$WORK/rnode/app" && cp -a "$A" "$WORK/rnode/app"
		timed "$WORK/patch-rsync-az.jsonl" rsync -az --delete "$B/" "rsync://$NODE_IP:$RSYNC_PORT/node/app/"
		same_tree "$B" "$WORK/rnode/app" patch-rsync-az
	done
	for DAEMON_PID in $RSYNCD_PID $RELSYNCD_PID $RELSYNCD_WC_PID; do
		stop_daemon
	done
	for k in patch-relsync patch-relsync-wc patch-rsync-linkdest patch-rsync-az; do
		summarize "$k" "$WORK/$k.jsonl"
	done
	rm -rf "$WORK/node" "$WORK/node-wc" "$WORK/cache"* "$W"
	rm -rf "$WORK/rnode" "$WORK/corpus"
fi

if [[ " $PUSH_SCENARIOS " == *" bulk "* ]]; then
	per=$((BULK_SIZE_MIB / BULK_FILES))
	log "bulk: $BULK_FILES incompressible files of $per MiB"
	mkdir -p "$WORK/bulk"
	for i in $(seq "$BULK_FILES"); do
		head -c $((per << 20)) /dev/urandom >"$WORK/bulk/part-$i.bin"
	done
	total=$((per * BULK_FILES << 20))
	mkdir -p "$WORK/node" "$WORK/cache"
	relsync_runs bulk-relsync "$WORK/bulk" "$WORK/node" "$WORK/cache" bulk
	rm -rf "$WORK/node" "$WORK/cache"

	log "bulk-quic: $RUNS runs of a bare $total-byte QUIC stream"
	ip netns exec "$NS" "$BIN_DIR/quic-baseline" server --listen "$NODE_IP:$QUIC_PORT" \
		--key "$WORK/daemon/daemon.key" --cert "$WORK/daemon/daemon.crt" --authorize "$CLIENT_FP" \
		2>"$WORK/quic.log" &
	DAEMON_PID=$!
	for _ in $(seq 100); do
		inns ss -uln | grep -q ":$QUIC_PORT " && break
		sleep 0.05
	done
	for i in $(seq "$RUNS"); do
		timed "$WORK/bulk-quic.jsonl" "$BIN_DIR/quic-baseline" client --connect "$NODE_IP:$QUIC_PORT" \
			--key "$WORK/client/id.key" --cert "$WORK/client/id.crt" --pin "$DAEMON_FP" --bytes "$total"
	done
	stop_daemon
	summarize bulk-quic "$WORK/bulk-quic.jsonl"
	rm -rf "$WORK/bulk"
fi

if [[ " $PUSH_SCENARIOS " == *" small "* ]]; then
	if [[ -n $SMALL_SRC ]]; then
		[[ -d $SMALL_SRC ]] || die "SMALL_SRC=$SMALL_SRC is not a directory"
		SRC=$(realpath -- "$SMALL_SRC")
	else
		log "small: generating $SMALL_FILES files ($SMALL_BYTES, seed $SEED)"
		"$BIN_DIR/relsync-testdata" --seed "$SEED" --files "$SMALL_FILES" --bytes "$SMALL_BYTES" \
			"$WORK/small-corpus" >&2
		SRC="$WORK/small-corpus/a"
	fi
	if [[ $(stat -f -c %T "$SRC") != tmpfs ]]; then
		DROP_CACHES=1
		SMALL_CACHE="cold: the source is on disk and the page cache is dropped before each run"
	else
		SMALL_CACHE="warm: the source is on tmpfs, no page cache to drop"
	fi
	log "small-relsync: $RUNS runs of relsync sync into an empty export ($SMALL_CACHE)"
	mkdir -p "$WORK/node" "$WORK/export"
	start_relsyncd "$WORK/node" "$WORK/export"
	for i in $(seq "$RUNS"); do
		rm -rf "$WORK/export/tree" "$WORK/sync-cache"
		mkdir -p "$WORK/sync-cache"
		RELSYNC_CACHE_DIR="$WORK/sync-cache" timed "$WORK/small-relsync.jsonl" \
			"$RELSYNC" sync "$SRC/" "relsync://$NODE_IP:$PORT/small/tree"
	done
	stop_daemon
	same_tree "$SRC" "$WORK/export/tree" small-relsync
	summarize small-relsync "$WORK/small-relsync.jsonl"
	rm -rf "$WORK/export" "$WORK/node" "$WORK/sync-cache"

	mkdir -p "$WORK/rnode"
	rsync_runs small-rsync "$SRC" "rm -rf '$WORK/rnode/tree'" -a "$SRC/" "rsync://$NODE_IP:$RSYNC_PORT/node/tree/"
	same_tree "$SRC" "$WORK/rnode/tree" small-rsync
	DROP_CACHES=""
	rm -rf "$WORK/rnode" "$WORK/small-corpus"
fi

field() { jq -r ".$2" <<<"${RESULT[$1]}"; }
row() {
	[[ -n ${RESULT[$1]:-} ]] || return 0
	printf '| %s | %.3f | %.3f | %.3f | %s | %s | %.2f | %.2f | %s |\n' "$2" \
		"$(field "$1" median)" "$(field "$1" min)" "$(field "$1" max)" \
		"$(field "$1" bytes_up)" "$(field "$1" bytes_down)" \
		"$(field "$1" client_cpu)" "$(field "$1" daemon_cpu)" "$3"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

report() {
	echo
	echo "# Push over a veth link, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, tmpfs, $RUNS runs each"
	echo
	echo "| scenario / tool | median s | min s | max s | bytes to node | bytes back | client CPU s | daemon CPU s | daemon peak RSS MiB |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
	row patch-relsync "patch: relsync push" "$(field patch-relsync daemon_rss_mib 2>/dev/null)"
	row patch-relsync-wc "patch: relsync push from a working copy" "$(field patch-relsync-wc daemon_rss_mib 2>/dev/null)"
	row patch-rsync-linkdest "patch: rsync daemon -c -z --link-dest" "n/a"
	row patch-rsync-az "patch: rsync daemon -az --delete" "n/a"
	row bulk-relsync "bulk: relsync push (initial)" "$(field bulk-relsync daemon_rss_mib 2>/dev/null)"
	row bulk-quic "bulk: bare QUIC stream" "n/a"
	row small-relsync "small: relsync sync (initial)" "$(field small-relsync daemon_rss_mib 2>/dev/null)"
	row small-rsync "small: rsync daemon -a (initial)" "n/a"
	echo
	if [[ -n ${RESULT[patch-relsync]:-} ]]; then
		local r=patch-relsync l=patch-rsync-linkdest z=patch-rsync-az
		local rb lb zb
		rb=$(($(field $r bytes_up) + $(field $r bytes_down)))
		lb=$(($(field $l bytes_up) + $(field $l bytes_down)))
		zb=$(($(field $z bytes_up) + $(field $z bytes_down)))
		echo "- rsync --link-dest ÷ relsync, time: $(ratio "$(field $l median)" "$(field $r median)") (target ≥ 4)"
		echo "- rsync -az ÷ relsync, time: $(ratio "$(field $z median)" "$(field $r median)")"
		echo "- rsync --link-dest ÷ relsync from a working copy (hash cache warm for the unchanged files), time:" \
			"$(ratio "$(field $l median)" "$(field patch-relsync-wc median)")"
		echo "- relsync ÷ rsync --link-dest, bytes both ways: $(ratio "$rb" "$lb") (target ≤ 0.5)"
		echo "- relsync ÷ rsync -az, bytes both ways: $(ratio "$rb" "$zb")"
		echo "- relsyncd peak RSS: $(field $r daemon_rss_mib) MiB (target ≤ 128)"
		local f
		f=$(awk -v r="$FLOOR_READ" -v l="$FLOOR_LINK" -v c="$(nproc)" 'BEGIN { print (r + l) / c }')
		echo "- CPU floor F = $f s (reading B $FLOOR_READ CPU s + cp -al of A $FLOOR_LINK CPU s, over $(nproc) CPUs; hashing left out):" \
			"rsync --link-dest ÷ F $(ratio "$(field $l median)" "$f") (the most any build could show here), relsync ÷ F $(ratio "$(field $r median)" "$f")"
	fi
	if [[ -n ${RESULT[bulk-relsync]:-} ]]; then
		echo "- bulk: relsync reaches $(awk -v q="$(field bulk-quic median)" -v r="$(field bulk-relsync median)" \
			'BEGIN { printf "%.0f", 100 * q / r }')% of the bare QUIC stream's rate (target ≥ 50%);" \
			"$(awk -v s="$(field bulk-relsync median)" -v b="$total" 'BEGIN { printf "%.0f", b / s / 1e6 }') MB/s vs" \
			"$(awk -v s="$(field bulk-quic median)" -v b="$total" 'BEGIN { printf "%.0f", b / s / 1e6 }') MB/s;" \
			"relsyncd peak RSS $(field bulk-relsync daemon_rss_mib) MiB"
	fi
	if [[ -n ${RESULT[small-relsync]:-} ]]; then
		echo "- small: rsync ÷ relsync, time: $(ratio "$(field small-rsync median)" "$(field small-relsync median)"); $SMALL_CACHE"
	fi
}

# The common summary benches/suite.sh collects: one RESULTS_DIR/KEY.summary.json per scenario
# (read by suite-report), wire bytes = median bytes to the node + median bytes back.
tool_json() { # key name
	jq -c --arg name "$2" '{name: $name, runs, median_s: .median, min_s: .min, max_s: .max,
		wire_bytes: (.bytes_up + .bytes_down)}' <<<"${RESULT[$1]}"
}
write_summary() { # key group title cache-note relsync-key [baseline-key baseline-name]...
	local key=$1 group=$2 title=$3 note=$4 cold=false
	[[ $note == cold* ]] && cold=true
	shift 4
	{
		tool_json "$1" relsync
		shift
		while (($#)); do
			tool_json "$1" "$2"
			shift 2
		done
	} | jq -s --arg s "$key" --arg g "$group" --arg t "$title" --arg n "$note" --argjson c "$cold" \
		'{scenario: $s, group: $g, title: $t, cold: $c, cache_note: $n, nodes: null, tools: .}' \
		>"$RESULTS_DIR/$key.summary.json"
}
summaries() {
	local warm="warm: corpus and node on tmpfs, no page cache to drop"
	if [[ -n ${RESULT[patch-relsync]:-} ]]; then
		write_summary push-patch push "push release B to a node holding A, over veth" "$warm" patch-relsync \
			patch-rsync-linkdest "rsync daemon -c -z --link-dest" patch-rsync-az "rsync daemon -az --delete"
		write_summary push-patch-wc push "push release B to a node holding A, over veth, from a working copy brought from A to B" \
			"$warm" patch-relsync-wc \
			patch-rsync-linkdest "rsync daemon -c -z --link-dest" patch-rsync-az "rsync daemon -az --delete"
	fi
	if [[ -n ${RESULT[bulk-relsync]:-} ]]; then
		write_summary push-bulk push "initial push of $BULK_FILES incompressible files, $BULK_SIZE_MIB MiB, over veth" \
			"$warm" bulk-relsync bulk-quic "bare QUIC stream"
	fi
	if [[ -n ${RESULT[small-relsync]:-} ]]; then
		write_summary small-net small "initial sync of $(find "$SRC" -type f | wc -l) small files over veth" \
			"$SMALL_CACHE" small-relsync small-rsync "rsync daemon -a"
	fi
}

[[ -z $RESULTS_DIR ]] || { mkdir -p "$RESULTS_DIR" && summaries; }
report | tee ${RESULTS_DIR:+"$RESULTS_DIR/push-report.md"}
