#!/bin/sh
# podsrl-rollout ARGS...: `podsrl rollout --server-id rollout-<i> ARGS...` for one replica of a scaled
# compose service. Installed as /usr/local/bin/podsrl-rollout in both images.
#
# Each of the $PODSRL_SLOTS replicas of the `rollout` service runs this script. It takes the first slot
# i in 0..PODSRL_SLOTS-1 whose lock file under $PODSRL_SLOT_DIR (a folder every replica shares) it can
# lock, then runs on GPU i of the GPUs the container sees (CUDA_VISIBLE_DEVICES=i; a no-op on CPU) as
# server rollout-<i>. The lock is held on file descriptor 9, which `exec` hands to the podsrl process: it
# is freed when that process ends (crash or restart included), so a restarted replica gets a free slot.
set -eu
slots=${PODSRL_SLOTS:?set PODSRL_SLOTS to the number of replicas (the compose file sets it)}
dir=${PODSRL_SLOT_DIR:?set PODSRL_SLOT_DIR to a folder every replica shares (the compose file sets it)}
mkdir -p "$dir"
i=0
while [ "$i" -lt "$slots" ]; do
    exec 9>>"$dir/slot-$i"
    if flock -n 9; then
        export CUDA_VISIBLE_DEVICES="$i"
        exec podsrl rollout --server-id "rollout-$i" "$@"
    fi
    exec 9>&-
    i=$((i + 1))
done
echo "podsrl-rollout: all $slots slots under $dir are taken: more replicas than PODSRL_SLOTS," \
     "or another run shares that folder" >&2
exit 1
