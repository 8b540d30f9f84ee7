#!/bin/bash
# A one-node Slurm on this machine, to run tests/deploy/test_slurm.py's live test (docs/DEPLOY.md, "Slurm").
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge. Writes DIR/slurm.conf (default
# /tmp/podsrl-slurm), starts munged (if not running), slurmctld and slurmd, and prints the SLURM_CONF to export:
#
#   bash deploy/slurm/one-node-slurm.sh && export SLURM_CONF=/tmp/podsrl-slurm/slurm.conf
#   python -m pytest -q tests/deploy/test_slurm.py
#
# Stop it with: kill $(cat /tmp/podsrl-slurm/slurmctld.pid) $(cat /tmp/podsrl-slurm/slurmd.pid)
set -euo pipefail
dir=${1:-/tmp/podsrl-slurm}
mkdir -p "$dir/state" "$dir/spool" "$dir/log"
cat > "$dir/slurm.conf" <<CONF
ClusterName=podsrl
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6917
SlurmdPort=6918
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName=localhost NodeHostname=$(hostname) CPUs=$(nproc) RealMemory=$(( $(free -m | awk '/Mem:/ {print $2}') / 2 )) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
pgrep -x munged > /dev/null || { mkdir -p /run/munge && chown munge:munge /run/munge && su -s /bin/sh munge -c /usr/sbin/munged; }
/usr/sbin/slurmctld -f "$dir/slurm.conf"
/usr/sbin/slurmd -f "$dir/slurm.conf" -N localhost
for _ in $(seq 50); do SLURM_CONF=$dir/slurm.conf sinfo -h 2>/dev/null | grep -q idle && break; sleep 0.2; done
SLURM_CONF=$dir/slurm.conf sinfo
echo "export SLURM_CONF=$dir/slurm.conf"
