#!/usr/bin/env bash
# A real two-node Slurm cluster (Debian's Slurm 22.05) on this one machine,
# for the project's tests and CI.  Must run as root.
#
#   bash tests/slurm/cluster.sh install   # apt-get what is missing (idempotent)
#   bash tests/slurm/cluster.sh start     # start munged, mariadb, slurmdbd, slurmctld, 2x slurmd
#   eval "$(bash tests/slurm/cluster.sh env)"   # export SLURM_CONF=...
#   bash tests/slurm/cluster.sh status
#   bash tests/slurm/cluster.sh stop      # cancel jobs, kill every daemon and job process
#
# All state lives under $SLURM_TEST_STATE (default: tests/slurm/state/).
# Nothing global is modified: no /etc/hosts, no /etc/slurm, no /etc/munge.
# The daemons run in a private mount namespace in which <state>/hosts is
# bind-mounted over /etc/hosts so that node1/node2 resolve inside jobs.
#
# Environment knobs (all optional):
#   SLURM_TEST_STATE          state dir (made absolute)
#   SLURM_TEST_PORT_BASE      17817; the ports below default to BASE+0..4
#   SLURM_TEST_CTLD_PORT      slurmctld            (BASE+0)
#   SLURM_TEST_NODE1_PORT     slurmd node1         (BASE+1)
#   SLURM_TEST_NODE2_PORT     slurmd node2         (BASE+2)
#   SLURM_TEST_DBD_PORT       slurmdbd             (BASE+3)
#   SLURM_TEST_MYSQL_PORT     private mariadb      (BASE+4)
#   SLURM_TEST_NODE_CPUS      CPUs advertised per node (4)
#   SLURM_TEST_NODE_MEM       RealMemory per node in MB (8000)
#   SLURM_TEST_START_TIMEOUT  seconds to wait for the cluster to be up (60)
#   SLURM_TEST_CRED_EXPIRE    munge credential lifetime; bounds requeue delay (10)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
STATE=$(realpath -m "${SLURM_TEST_STATE:-$SCRIPT_DIR/state}")
[[ $STATE != *[[:space:]]* ]] || { echo "[slurm-test] ERROR: state dir must not contain whitespace: '$STATE'" >&2; exit 1; }

PORT_BASE=${SLURM_TEST_PORT_BASE:-17817}
CTLD_PORT=${SLURM_TEST_CTLD_PORT:-$((PORT_BASE + 0))}
NODE1_PORT=${SLURM_TEST_NODE1_PORT:-$((PORT_BASE + 1))}
NODE2_PORT=${SLURM_TEST_NODE2_PORT:-$((PORT_BASE + 2))}
DBD_PORT=${SLURM_TEST_DBD_PORT:-$((PORT_BASE + 3))}
MYSQL_PORT=${SLURM_TEST_MYSQL_PORT:-$((PORT_BASE + 4))}
NODE_CPUS=${SLURM_TEST_NODE_CPUS:-4}
NODE_MEM=${SLURM_TEST_NODE_MEM:-8000}
START_TIMEOUT=${SLURM_TEST_START_TIMEOUT:-60}
CRED_EXPIRE=${SLURM_TEST_CRED_EXPIRE:-10}

CLUSTER_NAME=vitpipe-test
NODES=(node1 node2)
DB_USER=slurm
DB_PASS=slurm
DB_NAME=slurm_acct_db

ETC=$STATE/etc
MUNGE_DIR=$STATE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
MUNGE_KEY=$MUNGE_DIR/munge.key
MYSQL_DIR=$STATE/mysql
MYSQL_DATA=$MYSQL_DIR/data
MYSQL_SOCKET=$MYSQL_DIR/mysqld.sock
RUN=$STATE/run
LOG=$STATE/log
SPOOL=$STATE/spool
HOSTS_FILE=$STATE/hosts
NS_FILE=$RUN/mntns
SLURM_CONF_FILE=$ETC/slurm.conf
DBD_CONF_FILE=$ETC/slurmdbd.conf

# pid file per daemon; the slurmd ones are expanded from SlurmdPidFile=.../slurmd-%n.pid
declare -A PIDFILE=(
    [munged]=$RUN/munged.pid
    [mariadbd]=$RUN/mariadbd.pid
    [slurmdbd]=$RUN/slurmdbd.pid
    [slurmctld]=$RUN/slurmctld.pid
    [slurmd-node1]=$RUN/slurmd-node1.pid
    [slurmd-node2]=$RUN/slurmd-node2.pid
)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd-node1 slurmd-node2)

PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
BINARIES=(slurmctld slurmd slurmdbd sinfo squeue sbatch srun scancel scontrol sacct sacctmgr
          munged mungekey mariadbd mariadb-install-db mariadb mariadb-admin unshare mount flock setsid)

export SLURM_CONF=$SLURM_CONF_FILE

log() { printf '[slurm-test] %s\n' "$*" >&2; }
die() { printf '[slurm-test] ERROR: %s\n' "$*" >&2; exit 1; }

require_root() { [[ $(id -u) == 0 ]] || die "must run as root (daemons run as root, uses mount namespaces)"; }

missing_binaries() {
    local b out=()
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || out+=("$b"); done
    echo "${out[*]}"
}

lock_state() {  # serialise start/stop on one state dir; fd 9 is closed for the daemons
    [[ -z ${STATE_LOCKED:-} ]] || return 0
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 180 9 || die "another cluster.sh start/stop holds $STATE/.lock"
    STATE_LOCKED=1
}

env_cmd() {  # how to get the env of this state dir
    if [[ -n ${SLURM_TEST_STATE:-} ]]; then echo "SLURM_TEST_STATE=$STATE bash $SCRIPT env"; else echo "bash $SCRIPT env"; fi
}

# ---------------------------------------------------------------- process helpers
our_ns() { [[ -s $NS_FILE ]] && cat "$NS_FILE"; }

# has_our_bind PID: <state>/hosts is bind-mounted on /etc/hosts in PID's mount namespace
# (guards against a recycled namespace inode / pid after a crash or reboot)
has_our_bind() {
    local src
    src=$(awk '$5 == "/etc/hosts" {print $4}' "/proc/$1/mountinfo" 2>/dev/null | tail -n 1)
    [[ -n $src && $HOSTS_FILE == *"$src" ]]
}

# pid_ours PID: alive and inside the mount namespace our daemons were started in
pid_ours() {
    local pid=$1 ns
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -d /proc/$pid ]] || return 1
    ns=$(our_ns) || return 1
    [[ $(readlink "/proc/$pid/ns/mnt" 2>/dev/null) == "$ns" ]] && has_our_bind "$pid"
}

daemon_pid() {  # prints the pid of daemon $1 if it is running and ours
    local f=${PIDFILE[$1]} pid
    [[ -s $f ]] || return 1
    pid=$(tr -dc '0-9' <"$f")
    pid_ours "$pid" && echo "$pid"
}

ns_pids() {  # every process living in our mount namespace (daemons, slurmstepd, job tasks)
    local ns p
    ns=$(our_ns) || return 0
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $p == "$$" || $p == "$BASHPID" ]] && continue
        [[ $(readlink "/proc/$p/ns/mnt" 2>/dev/null) == "$ns" ]] && has_our_bind "$p" && echo "$p"
    done
    return 0
}

wait_gone() {  # wait_gone SECONDS PID... ; returns 1 if some are still alive
    local deadline=$((SECONDS + $1)) p alive
    shift
    while :; do
        alive=0
        for p in "$@"; do [[ -d /proc/$p ]] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { log "timed out waiting for $what"; return 1; }
        sleep 0.25
    done
}

tail_logs() {
    local f
    for f in "$LOG"/*.log; do
        [[ -s $f ]] || continue
        printf '\n===== tail -n 30 %s =====\n' "$f" >&2
        tail -n 30 "$f" >&2
    done
}

# ---------------------------------------------------------------- install
cmd_install() {
    require_root
    local missing
    missing=$(missing_binaries)
    if [[ -z $missing ]]; then
        log "install: all packages present ($(slurmctld -V 2>/dev/null))"
        return 0
    fi
    log "install: missing: $missing"
    command -v apt-get >/dev/null || die "apt-get not found: install ${PACKAGES[*]} by hand"
    export DEBIAN_FRONTEND=noninteractive
    local t0=$SECONDS apt_log=$STATE/log/install.log
    mkdir -p "$STATE/log"
    local apt_opts=(-y -q --no-install-recommends -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local pkgs=("${PACKAGES[@]}" util-linux mount coreutils)
    log "install: apt-get install ${pkgs[*]} (log: $apt_log)"
    if ! apt-get install "${apt_opts[@]}" "${pkgs[@]}" >"$apt_log" 2>&1; then
        log "install: apt-get update, then install again"
        apt-get update -q >>"$apt_log" 2>&1 || { tail -n 30 "$apt_log" >&2; die "apt-get update failed"; }
        apt-get install "${apt_opts[@]}" "${pkgs[@]}" >>"$apt_log" 2>&1 \
            || { tail -n 30 "$apt_log" >&2; die "apt-get install ${pkgs[*]} failed"; }
    fi
    missing=$(missing_binaries)
    [[ -z $missing ]] || die "still missing after install: $missing"
    log "install: done in $((SECONDS - t0)) s ($(slurmctld -V))"
}

# ---------------------------------------------------------------- config
first_job_id() {
    # Time based, so a job id is not reused across cluster restarts (stale submitit
    # result files in a reused folder); never below what the accounting DB has seen.
    local id db_max
    id=$(( $(date +%s) % 50000000 + 1000 ))
    db_max=$(sacct -a -X -n -P -o JobIDRaw -S 1970-01-01T00:00:00 -E now 2>/dev/null \
             | grep -Eo '^[0-9]+' | sort -n | tail -n 1 || true)
    if [[ -n $db_max ]] && ((db_max + 1 > id && db_max + 1 < 60000000)); then id=$((db_max + 1)); fi
    echo "$id"
}

write_hosts() {  # outside the namespace only: inside it /etc/hosts *is* this file
    local tmp=$HOSTS_FILE.tmp
    { cat /etc/hosts; echo; echo "# vitpipe test cluster (tests/slurm/cluster.sh)"; echo "127.0.0.1 ${NODES[*]}"; } >"$tmp"
    mv -f "$tmp" "$HOSTS_FILE"
}

write_configs() {
    local host
    host=$(hostname -s)
    mkdir -p "$ETC" "$RUN" "$LOG" "$SPOOL" "$MYSQL_DIR/tmp"
    install -d -m 0755 "$MUNGE_DIR"

    cat >"$SLURM_CONF_FILE" <<EOF
# Generated by tests/slurm/cluster.sh -- regenerated on every start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$NODE1_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$SPOOL/ctld
SlurmdSpoolDir=$SPOOL/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=60
InactiveLimit=0
Waittime=0
SlurmctldTimeout=60
SlurmdTimeout=120
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
FirstJobId=$FIRST_JOB_ID
NodeName=node1 NodeAddr=127.0.0.1 Port=$NODE1_PORT CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 Port=$NODE2_PORT CPUs=$NODE_CPUS RealMemory=$NODE_MEM State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF

    (umask 077; cat >"$DBD_CONF_FILE" <<EOF
# Generated by tests/slurm/cluster.sh -- regenerated on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOG/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
    )
    chmod 600 "$DBD_CONF_FILE"
}

# ---------------------------------------------------------------- start (inside the namespace)
mysql_root() { mariadb --no-defaults --protocol=socket --socket="$MYSQL_SOCKET" -uroot "$@"; }

start_munged() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating munge key"
        rm -f "$MUNGE_KEY"
        mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null \
            || (umask 077; dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none)
    fi
    chmod 600 "$MUNGE_KEY"
    log "starting munged (socket $MUNGE_SOCKET)"
    # more threads than the default 2: a loaded 2-core machine answering sacct/squeue polls timed out munge
    # ("If munged is up, restart with --num-threads=10"), then slurmctld marked node1 down as not responding
    munged --force --num-threads=10 --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" --pid-file="${PIDFILE[munged]}" \
        --log-file="$LOG/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        </dev/null >>"$LOG/munged.log" 2>&1 || { tail_logs; die "munged failed to start"; }
    wait_for 10 "munge socket" test -S "$MUNGE_SOCKET" || { tail_logs; die "munged did not come up"; }
    chmod 0755 "$MUNGE_DIR"
}

start_mariadb() {
    if [[ ! -d $MYSQL_DATA/mysql ]]; then
        log "initialising mariadb datadir $MYSQL_DATA"
        rm -rf "$MYSQL_DATA"
        mkdir -p "$MYSQL_DATA"
        mariadb-install-db --no-defaults --user=root --datadir="$MYSQL_DATA" \
            --auth-root-authentication-method=socket --skip-test-db \
            >>"$LOG/mariadb-install.log" 2>&1 || { tail_logs; die "mariadb-install-db failed"; }
    fi
    log "starting mariadb (127.0.0.1:$MYSQL_PORT, socket $MYSQL_SOCKET)"
    setsid mariadbd --no-defaults --user=root --datadir="$MYSQL_DATA" --socket="$MYSQL_SOCKET" \
        --port="$MYSQL_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="${PIDFILE[mariadbd]}" --log-error="$LOG/mariadb.log" --tmpdir="$MYSQL_DIR/tmp" \
        --skip-log-bin --innodb-buffer-pool-size=128M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --innodb-use-native-aio=0 --max-connections=200 \
        </dev/null >>"$LOG/mariadb.log" 2>&1 &
    wait_for 60 "mariadb" mariadb-admin --no-defaults --protocol=socket --socket="$MYSQL_SOCKET" -uroot ping \
        || { tail_logs; die "mariadb did not come up"; }
    mysql_root -e "
        CREATE DATABASE IF NOT EXISTS $DB_NAME;
        CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'127.0.0.1';
        GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
        FLUSH PRIVILEGES;" || { tail_logs; die "could not create the slurm database user"; }
}

start_slurmdbd() {
    log "starting slurmdbd (127.0.0.1:$DBD_PORT)"
    slurmdbd </dev/null >>"$LOG/slurmdbd.log" 2>&1 || { tail_logs; die "slurmdbd failed to start"; }
    wait_for 60 "slurmdbd" sacctmgr -n list cluster || { tail_logs; die "slurmdbd did not answer"; }
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
        log "registering cluster $CLUSTER_NAME in slurmdbd"
        sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || die "sacctmgr add cluster failed"
    fi
}

start_in_ns() {  # runs inside `unshare -m`: everything started here shares the namespace
    mount --bind "$HOSTS_FILE" /etc/hosts || die "cannot bind-mount $HOSTS_FILE over /etc/hosts"
    readlink /proc/self/ns/mnt >"$NS_FILE"
    if ! getent hosts node1 >/dev/null || ! getent hosts localhost >/dev/null; then
        die "node1/localhost do not resolve inside the namespace"
    fi
    start_munged
    start_mariadb
    start_slurmdbd
    FIRST_JOB_ID=$(first_job_id)
    write_configs   # now with the final FirstJobId
    log "starting slurmctld (127.0.0.1:$CTLD_PORT, FirstJobId=$FIRST_JOB_ID)"
    slurmctld </dev/null >>"$LOG/slurmctld.log" 2>&1 || { tail_logs; die "slurmctld failed to start"; }
    local n
    for n in "${NODES[@]}"; do
        log "starting slurmd $n"
        slurmd -N "$n" </dev/null >>"$LOG/slurmd-$n.log" 2>&1 || { tail_logs; die "slurmd $n failed to start"; }
    done
}

# ---------------------------------------------------------------- status helpers
all_daemons_up() {
    local d
    for d in "${DAEMONS[@]}"; do daemon_pid "$d" >/dev/null || return 1; done
}

nodes_idle() {
    local out
    out=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null) || return 1
    [[ $(grep -cE '^node[12] idle$' <<<"$out") == 2 ]]
}

sacct_ok() {
    local err
    err=$(sacct -n -X -S now-1hours -o JobID 2>&1 >/dev/null) || return 1
    [[ -z $err ]]
}

cluster_up() { all_daemons_up && nodes_idle_or_busy && sacct_ok; }

nodes_idle_or_busy() {  # used by "already running": nodes may be running jobs
    local out
    out=$(sinfo -h -N -p debug -o '%N %T' 2>/dev/null) || return 1
    [[ $(grep -cE '^node[12] (idle|mixed|allocated|completing)$' <<<"$out") == 2 ]]
}

# ---------------------------------------------------------------- start / stop / status
cmd_start() {
    require_root
    local missing
    missing=$(missing_binaries)
    [[ -z $missing ]] || die "missing binaries: $missing (run: bash $SCRIPT install)"
    unshare -m --propagation private true 2>/dev/null \
        || die "unshare -m is not permitted here (needs root with CAP_SYS_ADMIN, e.g. docker --privileged); it is used to give the daemons a private /etc/hosts with node1/node2"
    lock_state
    if [[ -s $NS_FILE ]] && cluster_up; then
        log "already running (state $STATE)"
        return 0
    fi
    local t0=$SECONDS
    if [[ -s $NS_FILE && -n $(ns_pids) ]]; then
        log "found a partial/stale cluster: stopping it first"
        cmd_stop
    fi

    log "cleaning stale state in $STATE"
    rm -f "$RUN"/*.pid "$NS_FILE" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MYSQL_SOCKET" "$MYSQL_SOCKET.lock"
    rm -rf "$SPOOL"
    mkdir -p "$LOG" "$SPOOL/ctld" "$SPOOL/node1" "$SPOOL/node2"
    local f
    for f in "$LOG"/*.log; do [[ -e $f ]] && : >"$f"; done

    local name port
    if [[ $(printf '%s\n' "$CTLD_PORT" "$NODE1_PORT" "$NODE2_PORT" "$DBD_PORT" "$MYSQL_PORT" | sort -u | wc -l) != 5 ]]; then
        die "ports must be distinct: ctld=$CTLD_PORT node1=$NODE1_PORT node2=$NODE2_PORT dbd=$DBD_PORT mysql=$MYSQL_PORT"
    fi
    for name in CTLD:$CTLD_PORT NODE1:$NODE1_PORT NODE2:$NODE2_PORT DBD:$DBD_PORT MYSQL:$MYSQL_PORT; do
        port=${name#*:}
        if port_busy "$port"; then
            die "port $port is in use (SLURM_TEST_${name%%:*}_PORT); set SLURM_TEST_PORT_BASE or SLURM_TEST_${name%%:*}_PORT"
        fi
    done

    FIRST_JOB_ID=1  # placeholder until slurmdbd can tell us the highest id it has seen
    write_configs
    write_hosts
    log "starting daemons in a private mount namespace (state $STATE)"
    if ! unshare -m --propagation private bash "$SCRIPT" __start_in_ns 9>&-; then
        log "start failed; stopping what was started"
        cmd_stop || true
        exit 1
    fi

    log "waiting (<= ${START_TIMEOUT}s) for node1/node2 idle and sacct answering"
    local deadline=$((t0 + START_TIMEOUT))
    ((deadline > SECONDS + 10)) || deadline=$((SECONDS + 10))
    until nodes_idle && sacct_ok; do
        if ((SECONDS >= deadline)); then
            log "cluster did not come up within ${START_TIMEOUT}s"
            sinfo -N -l >&2 || true
            tail_logs
            cmd_stop || true
            die "start failed (state and logs kept in $STATE)"
        fi
        sleep 0.5
    done
    log "cluster $CLUSTER_NAME up in $((SECONDS - t0)) s: nodes node1,node2 (partition debug), ctld port $CTLD_PORT"
    log "use it with:  eval \"\$($(env_cmd))\""
}

cmd_stop() {
    require_root
    [[ -d $STATE ]] || { log "stop: no state dir $STATE"; return 0; }
    lock_state
    if [[ ! -s $NS_FILE ]]; then
        log "stop: nothing recorded as started (no $NS_FILE)"
        return 0
    fi
    if daemon_pid slurmctld >/dev/null; then
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ' || true)
        if [[ -n ${jobs// /} ]]; then
            log "stop: cancelling jobs $jobs"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            local deadline=$((SECONDS + 15))
            while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
        fi
    fi
    local d pid pids=()
    # slurm first, then its database, then munge
    for d in slurmd-node1 slurmd-node2 slurmctld slurmdbd mariadbd munged; do
        if pid=$(daemon_pid "$d"); then
            log "stop: $d (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            if [[ $d == slurmdbd || $d == mariadbd ]]; then wait_gone 20 "$pid" || true; fi
        fi
    done
    ((${#pids[@]} == 0)) || wait_gone 15 "${pids[@]}" || true
    # leftovers: slurmstepd, job processes, daemons without pid file
    local rest
    mapfile -t rest < <(ns_pids)
    if ((${#rest[@]})); then
        log "stop: terminating leftover processes ${rest[*]}"
        kill -TERM "${rest[@]}" 2>/dev/null || true
        wait_gone 5 "${rest[@]}" || true
        mapfile -t rest < <(ns_pids)
        if ((${#rest[@]})); then
            log "stop: killing ${rest[*]}"
            kill -KILL "${rest[@]}" 2>/dev/null || true
            wait_gone 5 "${rest[@]}" || true
        fi
    fi
    mapfile -t rest < <(ns_pids)
    ((${#rest[@]} == 0)) || die "stop: processes still alive: ${rest[*]}"
    rm -f "$RUN"/*.pid "$NS_FILE" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MYSQL_SOCKET"
    log "stop: done"
}

cmd_status() {
    local d pid rc=0
    echo "state: $STATE"
    echo "SLURM_CONF=$SLURM_CONF_FILE"
    for d in "${DAEMONS[@]}"; do
        if pid=$(daemon_pid "$d"); then echo "  $d: running (pid $pid)"; else echo "  $d: not running"; rc=1; fi
    done
    if sinfo -N -o '%N %P %T %c %m' 2>/dev/null; then :; else echo "sinfo: no answer"; rc=1; fi
    if sacct_ok; then echo "sacct: ok"; else echo "sacct: no answer"; rc=1; fi
    return $rc
}

cmd_env() {
    [[ -f $SLURM_CONF_FILE ]] || log "warning: $SLURM_CONF_FILE does not exist yet (run: bash $SCRIPT start)"
    echo "export SLURM_CONF=$SLURM_CONF_FILE"
    echo "export SLURM_TEST_STATE=$STATE"
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    __start_in_ns) start_in_ns ;;
    *) echo "usage: $0 {install|start|stop|status|env}" >&2; exit 2 ;;
esac
