#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try `sweep.py --slurm` without a cluster (and for its test).
# Needs root and the distribution's packages: apt-get install slurm-wlm munge (Debian/Ubuntu).
#
#   bash slurm-local.sh start DIR     # writes DIR/slurm.conf, starts munged, slurmctld and slurmd
#   export SLURM_CONF=DIR/slurm.conf  # then sbatch, squeue, scontrol, scancel use this cluster
#   bash slurm-local.sh stop DIR
#
# No cgroups (proctrack/linuxproc, task/none) and no accounting database: `sacct` has nothing, `squeue`
# and `scontrol show job` have the state. Jobs run as the user who submits them. A requeued job waits
# cred_expire + 1 seconds before it may start again (Slurm's default 120, here 10).
set -euo pipefail
cmd=${1:?start or stop}
dir=$(realpath -m "${2:?a folder for the cluster\'s config, state and logs}")

case $cmd in
start)
    mkdir -p "$dir/state" "$dir/spool" "$dir/log"
    host=$(hostname -s)
    memory=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 8 / 10 ))
    cat > "$dir/slurm.conf" <<EOF
ClusterName=ia2local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
NodeName=$host CPUs=$(nproc --all) RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        mkdir -p /run/munge && chown munge:munge /run/munge
        su -s /bin/sh munge -c /usr/sbin/munged
    fi
    slurmctld -f "$dir/slurm.conf"
    slurmd -f "$dir/slurm.conf"
    sleep 1
    for daemon in slurmctld slurmd; do  # ours, running (not another cluster's, on the same ports)
        if ! kill -0 "$(cat "$dir/$daemon.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
            echo "slurm-local.sh: $daemon did not start (another Slurm on its port?); see $dir/log/" >&2
            exit 1
        fi
    done
    for _ in $(seq 60); do
        if SLURM_CONF="$dir/slurm.conf" sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "a one-node Slurm cluster is up: export SLURM_CONF=$dir/slurm.conf"
            exit 0
        fi
        sleep 0.5
    done
    echo "slurm-local.sh: the node did not come up; see $dir/log/" >&2
    exit 1
    ;;
stop)
    for daemon in slurmd slurmctld; do
        if [ -f "$dir/$daemon.pid" ]; then
            pid=$(cat "$dir/$daemon.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 100); do  # gone, and its port free for the next cluster
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
        fi
    done
    ;;
*)
    echo "usage: bash slurm-local.sh start|stop DIR" >&2
    exit 2
    ;;
esac
