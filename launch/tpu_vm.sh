#!/usr/bin/env bash
# SiameseIM pretraining on a Cloud TPU VM slice: create it, install siim_jax on every worker, start the same
# training command on every worker, stream worker 0's log, and re-create + resume when the slice is preempted or
# the run stops resumably (exit status 75). See launch/README.md.
set -euo pipefail

prog="launch/tpu_vm.sh"

usage() {
    cat <<'EOF'
usage: launch/tpu_vm.sh [options] [-- train flags...]

Create a Cloud TPU VM slice (or reuse one), install siim_jax on every worker, run
  python -m siim_jax.train --config CONFIG --workdir gs://... [train flags...]
on all workers at once and stream worker 0's log. On exit status 75 (stopped resumably) the same
command starts again; on a preemption the slice is deleted and re-created first. Either way the
run resumes from the checkpoints in the gs:// workdir.

options:
  --name NAME              TPU VM (and queued resource) name          [siim-vit-b16]
  --zone ZONE              zone with TPU quota                        [us-central2-b]
  --type TYPE              accelerator type, e.g. v4-32, v5p-32, v6e-16 [v4-32]
  --runtime-version V      TPU software version                       [picked from --type:
                           v4 tpu-ubuntu2204-base, v5p v2-alpha-tpuv5,
                           v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e]
  --mode MODE              on-demand | spot | queued | queued-spot    [on-demand]
                           (queued: gcloud compute tpus queued-resources create, waits for capacity;
                            spot / queued-spot: --spot, cheaper, preemptible at any time)
  --project PROJECT        GCP project                                [gcloud's configured project]
  --workdir gs://B/P       checkpoints, metrics.jsonl, tensorboard    [gs://YOUR_BUCKET/siim/vit_b16]
  --config FILE            recipe, relative to the repository root    [configs/siamese_vit_b16_1600ep.py]
  --repo URL               git repository to install on every worker  [https://github.com/YOUR_ORG/siim_jax.git]
  --ref REF                branch, tag or commit of --repo            [main]
  --python VERSION         Python for the workers' virtual env (uv)   [3.12]
  --install-cmd CMD        install step on every worker instead of cloning --repo and installing it with uv,
                           e.g. on an image with siim_jax already installed:
                           --install-cmd 'ln -sfn /opt/siim_jax ~/siim_jax && ln -sfn /opt/venv ~/siim-venv'
                           (one line of shell; afterwards ~/siim_jax must hold configs/ and
                           ~/siim-venv/bin/python must import siim_jax)
  --max-restarts N         re-creations / resumes before giving up    [10]
  --poll-seconds S         wait between state checks                  [60]
  --delete-when-done       delete the slice after the run finished (exit status 0)
  --dry-run                print every gcloud command (prefixed '+ '), run none (needs no gcloud)
  -h, --help               this help
  -- FLAGS...              passed to siim_jax.train, e.g. -- --config.data.source=tfds:imagenet2012
                             --config.data.tfds_data_dir=gs://YOUR_BUCKET/tensorflow_datasets

exit status: 0 finished (checkpoints in WORKDIR/checkpoints), 1 failed, 2 bad command line,
75 still resumable after --max-restarts (rerun the same command), other: the training's exit status
(the first failing worker's; a worker that crashed, status > 128, is restarted like a stop, up to --max-restarts
times).
Every start of one launcher run gets SIIM_LAUNCH_ID=NAME-<launcher start time> (or $SIIM_LAUNCH_ID if
set): a resumed run takes over the workdir lock of the run it replaces at once.

example:
  launch/tpu_vm.sh --name siim-b16 --zone us-central2-b --type v4-64 --mode spot \
      --workdir gs://my-bucket/siim/vit_b16 --repo https://github.com/me/siim_jax.git --ref v1.0 \
      -- --config.data.source=tfds:imagenet2012 --config.data.tfds_data_dir=gs://my-bucket/tfds
EOF
}

die_usage() {  # one line on stderr, exit status 2
    echo "$prog: error: $1 (see $prog --help)" >&2
    exit 2
}

die() {
    echo "$prog: error: $1" >&2
    exit "${2:-1}"
}

exec 3>&1  # progress goes to the original stdout, also from inside $(...)

log() {
    echo "[$prog $(date -u +%H:%M:%SZ)] $*" >&3
}

# ---------------------------------------------------------------------------------------------- command line
name="siim-vit-b16"
zone="us-central2-b"
accel="v4-32"
runtime=""
mode="on-demand"
project=""
workdir="gs://YOUR_BUCKET/siim/vit_b16"
config="configs/siamese_vit_b16_1600ep.py"
repo="https://github.com/YOUR_ORG/siim_jax.git"
ref="main"
python_version="3.12"
install_custom=""
max_restarts=10
poll_seconds=60
delete_when_done=0
dry_run=0
train_flags=()

need_value() {  # $1 flag, $2 number of remaining arguments
    [[ $2 -ge 2 ]] || die_usage "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --dry-run) dry_run=1; shift ;;
        --delete-when-done) delete_when_done=1; shift ;;
        --) shift; train_flags=("$@"); break ;;
        --*=*)  # --flag=value: split and reparse
            flag="${1%%=*}"; value="${1#*=}"; shift
            set -- "$flag" "$value" "$@" ;;
        --name | --zone | --type | --runtime-version | --mode | --project | --workdir | --config | --repo | --ref \
            | --python | --install-cmd | --max-restarts | --poll-seconds)
            need_value "$1" "$#"
            case "$1" in
                --name) name="$2" ;;
                --zone) zone="$2" ;;
                --type) accel="$2" ;;
                --runtime-version) runtime="$2" ;;
                --mode) mode="$2" ;;
                --project) project="$2" ;;
                --workdir) workdir="$2" ;;
                --config) config="$2" ;;
                --repo) repo="$2" ;;
                --ref) ref="$2" ;;
                --python) python_version="$2" ;;
                --install-cmd)
                    install_custom="$2"
                    [[ $2 =~ [^[:space:]] ]] || die_usage "--install-cmd needs a command" ;;
                --max-restarts) max_restarts="$2" ;;
                --poll-seconds) poll_seconds="$2" ;;
            esac
            shift 2 ;;
        *) die_usage "unknown argument '$1' (train flags go after --)" ;;
    esac
done

case "$mode" in
    on-demand | spot | queued | queued-spot) ;;
    *) die_usage "--mode must be on-demand, spot, queued or queued-spot, not '$mode'" ;;
esac
[[ $max_restarts =~ ^[0-9]+$ ]] || die_usage "--max-restarts must be an integer >= 0, not '$max_restarts'"
[[ $poll_seconds =~ ^[1-9][0-9]*$ ]] || die_usage "--poll-seconds must be an integer >= 1, not '$poll_seconds'"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die_usage "--name must be lower-case letters, digits and '-', not '$name'"
[[ -n $zone && -n $accel && -n $config && -n $repo && -n $ref && -n $python_version ]] \
    || die_usage "--zone, --type, --config, --repo, --ref and --python need non-empty values"
[[ $install_custom != *$'\n'* ]] || die_usage "--install-cmd must be one line (join commands with ; or &&)"
[[ $workdir == gs://?* ]] \
    || die_usage "--workdir must be a gs:// path (every worker, and every re-created slice, must see it), not '$workdir'"

if [[ -z $runtime ]]; then
    case "$accel" in
        v4-*) runtime="tpu-ubuntu2204-base" ;;
        v5p-*) runtime="v2-alpha-tpuv5" ;;
        v5litepod-* | v5e-*) runtime="v2-alpha-tpuv5-lite" ;;
        v6e-*) runtime="v2-alpha-tpuv6e" ;;
        *) die_usage "no default --runtime-version for --type $accel; pass one" ;;
    esac
fi

if [[ $dry_run == 0 ]]; then
    [[ $workdir != *YOUR_BUCKET* ]] || die_usage "--workdir $workdir is a placeholder; pass your bucket"
    [[ -n $install_custom || $repo != *YOUR_ORG* ]] || die_usage "--repo $repo is a placeholder; pass the repository the workers install"
    command -v gcloud > /dev/null || die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)"
fi

# -------------------------------------------------------------------------------------------------- helpers
shq() {  # quote one word for a POSIX shell, readably
    local s="$1"
    if [[ -n $s && $s =~ ^[-A-Za-z0-9_./:=@%+,]+$ ]]; then
        printf '%s' "$s"
    else
        printf "'%s'" "${s//\'/\'\\\'\'}"
    fi
}

show() {  # print a command as '+ word word ...', --flag=value as --flag='value'
    local out="+" word
    for word in "$@"; do
        if [[ $word =~ ^(--[a-z][-a-z]*=)(.*)$ ]]; then
            out+=" ${BASH_REMATCH[1]}$(shq "${BASH_REMATCH[2]}")"
        else
            out+=" $(shq "$word")"
        fi
    done
    printf '%s\n' "$out"
}

note() {  # a comment line in the dry-run / progress output
    printf '# %s\n' "$*"
}

run() {  # print, then run unless --dry-run
    show "$@"
    [[ $dry_run == 1 ]] || "$@"
}

query() {  # print, then run unless --dry-run (then print $1 instead): for commands whose output is used; the
    # command's exit status
    local dry_answer="$1"; shift
    show "$@" >&3
    if [[ $dry_run == 1 ]]; then
        printf '%s\n' "$dry_answer"
    else
        "$@" 2> /dev/null
    fi
}

project_flag=()
[[ -z $project ]] || project_flag=(--project="$project")
common=(--zone="$zone" "${project_flag[@]}")
tpu=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)

# ------------------------------------------------------------------------------------- what runs on workers
# shellcheck disable=SC2088  # the tildes are for the workers' shell to expand
home_repo="~/siim_jax" venv="~/siim-venv"
# one id for every start of this launcher run: the workdir lock lets a run of the same launch take over at once
# (a re-created slice has new host names, and the killed run's lock would otherwise hold for its stale time)
launch_id="${SIIM_LAUNCH_ID:-$name-$(date -u +%Y%m%dT%H%M%SZ)}"
train_cmd="SIIM_LAUNCH_ID=$(shq "$launch_id") nohup $venv/bin/python -m siim_jax.train --config $(shq "$config")"
train_cmd+=" --workdir $(shq "$workdir")"
for flag in "${train_flags[@]}"; do
    train_cmd+=" $(shq "$flag")"
done

running="[ -f ~/siim_train.pid ] && kill -0 \"\$(cat ~/siim_train.pid)\" 2> /dev/null"

# uv brings a Python >= 3.11 (the TPU images ship 3.10); one resolve for jax[tpu] and siim_jax keeps them matched
install_cmd="if $running; then echo \"\$(hostname): training running, install skipped\"; exit 0; fi; \
set -e; export PATH=\"\$HOME/.local/bin:\$PATH\"; \
command -v uv > /dev/null || python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh; \
[ -d $home_repo/.git ] || git clone --quiet $(shq "$repo") $home_repo; \
cd $home_repo; git remote set-url origin $(shq "$repo"); git fetch --quiet origin $(shq "$ref"); \
git checkout --quiet --force --detach FETCH_HEAD; \
[ -x $venv/bin/python ] || uv venv --quiet --python $(shq "$python_version") $venv; \
uv pip install --quiet --python $venv/bin/python \"jax[tpu]\" -e $home_repo; \
echo \"\$(hostname): siim_jax \$(git -C $home_repo rev-parse --short HEAD) installed\"; \
echo \"siim_pin_commit=\$(git -C $home_repo rev-parse HEAD)\"; \
echo \"siim_pin_packages=\$(uv pip freeze --quiet --exclude-editable --python $venv/bin/python | base64 | tr -d '\\n')\""

# after a re-creation: exactly the commit and packages of the first install (a moved --ref or a new release of a
# dependency must not change a run half-way); set once the first install reported them (pinned_install_cmd)
pinned_commit="" pinned_packages=""
pinned_install_cmd() {
    printf '%s' "if $running; then echo \"\$(hostname): training running, install skipped\"; exit 0; fi; \
set -e; export PATH=\"\$HOME/.local/bin:\$PATH\"; \
command -v uv > /dev/null || python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh; \
[ -d $home_repo/.git ] || git clone --quiet $(shq "$repo") $home_repo; \
cd $home_repo; git fetch --quiet origin $(shq "$ref") || true; \
git cat-file -e $pinned_commit^{commit} 2> /dev/null || git fetch --quiet origin $pinned_commit; \
git checkout --quiet --force --detach $pinned_commit; \
[ -x $venv/bin/python ] || uv venv --quiet --python $(shq "$python_version") $venv; \
echo $pinned_packages | base64 -d > ~/siim_pinned_requirements.txt; \
uv pip install --quiet --python $venv/bin/python -r ~/siim_pinned_requirements.txt; \
uv pip install --quiet --no-deps --python $venv/bin/python -e $home_repo; \
echo \"\$(hostname): siim_jax ${pinned_commit:0:7} installed, pinned to the first install (commit and packages)\""
}
if [[ -n $install_custom ]]; then  # --install-cmd: the user's own step, same guard
    install_cmd="if $running; then echo \"\$(hostname): training running, install skipped\"; exit 0; fi; \
set -e; $install_custom; echo \"\$(hostname): --install-cmd done\""
fi

# refuses to start a second run while one started by this launcher is alive (rerunning the launcher re-attaches)
start_cmd="cd $home_repo && if $running; then echo \"\$(hostname): training already running, not starting another\"; \
else rm -f ~/siim_train.rc; ( trap \"\" HUP; $train_cmd > ~/siim_train.log 2>&1 < /dev/null; \
echo \$? > ~/siim_train.rc ) > /dev/null 2>&1 < /dev/null & echo \$! > ~/siim_train.pid; \
echo \"\$(hostname): training started, log in ~/siim_train.log\"; fi"

# ends when the training process of worker 0 ends; the whole log after a start, its end after a reconnection
stream_cmd="tail -n +1 -F --pid=\"\$(cat ~/siim_train.pid)\" ~/siim_train.log"
reattach_cmd="tail -n 20 -F --pid=\"\$(cat ~/siim_train.pid)\" ~/siim_train.log"
# one line per worker: siim_status=<exit status>, none: still running, lost: neither (the worker rebooted)
status_cmd="if [ -f ~/siim_train.rc ]; then echo \"siim_status=\$(cat ~/siim_train.rc)\"; \
elif $running; then echo siim_status=none; else echo siim_status=lost; fi"

# ------------------------------------------------------------------------------------------------- steps
describe() {  # $1: the dry-run answer; prints the state, "" when it does not exist, UNKNOWN when gcloud failed
    local dry_answer="$1" out err
    shift
    show "$@" >&3
    if [[ $dry_run == 1 ]]; then
        printf '%s\n' "$dry_answer"
        return 0
    fi
    err="$(mktemp)"
    if out="$("$@" 2> "$err")"; then
        printf '%s\n' "$out"
    elif grep -qi 'not[ _]found' "$err"; then
        printf '\n'
    else
        log "$(tr '\n' ' ' < "$err")"
        printf 'UNKNOWN\n'
    fi
    rm -f "$err"
}

node_state() {  # READY, PREEMPTED, CREATING, ... or "" when the node does not exist
    describe "$1" "${tpu[@]}" describe "$name" "${common[@]}" --format='value(state)'
}

qr_state() {  # ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, FAILED, ... or "" when it does not exist
    describe "$1" "${qr[@]}" describe "$name" "${common[@]}" --format='value(state.state)'
}

delete_slice() {
    if [[ $mode == queued* ]]; then
        run "${qr[@]}" delete "$name" "${common[@]}" --force --quiet --async
        # --async + poll: a queued resource deletion can outlast gcloud's wait
        local state
        while state="$(qr_state "")" && [[ -n $state ]]; do  # UNKNOWN too: try again
            [[ $dry_run == 0 ]] || break
            log "queued resource $name: $state (waiting for the deletion)"
            sleep "$poll_seconds"
        done
    else
        run "${tpu[@]}" delete "$name" "${common[@]}" --quiet
    fi
}

create_slice() {
    local spot=()
    [[ $mode != *spot ]] || spot=(--spot)
    if [[ $mode == queued* ]]; then
        run "${qr[@]}" create "$name" --node-id="$name" "${common[@]}" --accelerator-type="$accel" \
            --runtime-version="$runtime" "${spot[@]}"
        [[ $dry_run == 0 ]] || note "(polled every $poll_seconds s until ACTIVE)"
        wait_active
    else
        run "${tpu[@]}" create "$name" "${common[@]}" --accelerator-type="$accel" --version="$runtime" "${spot[@]}"
    fi
}

wait_active() {  # queued: capacity can take minutes to days
    local state
    while :; do
        state="$(qr_state ACTIVE)"
        case "$state" in
            ACTIVE) return 0 ;;
            UNKNOWN) sleep "$poll_seconds" ;;
            FAILED | SUSPENDED | "") die "queued resource $name is ${state:-gone}; see gcloud compute tpus queued-resources describe $name --zone=$zone" ;;
            *) log "queued resource $name: $state"; sleep "$poll_seconds" ;;
        esac
    done
}

ensure_slice() {  # create the slice, or reuse a READY one
    local state
    if [[ $mode == queued* ]]; then
        state="$(qr_state "")"
        [[ $dry_run == 0 ]] || note "(dry run: assuming the queued resource does not exist yet)"
        case "$state" in
            "") create_slice ;;
            UNKNOWN) die "cannot query queued resource $name (see the message above)" ;;
            ACTIVE) log "reusing queued resource $name (ACTIVE)" ;;
            SUSPENDED | FAILED | SUSPENDING) log "queued resource $name is $state: re-creating it"; delete_slice; create_slice ;;
            *) log "queued resource $name is $state: waiting"; wait_active ;;
        esac
    else
        state="$(node_state "")"
        [[ $dry_run == 0 ]] || note "(dry run: assuming the slice does not exist yet)"
        case "$state" in
            "") create_slice ;;
            UNKNOWN) die "cannot query slice $name (see the message above)" ;;
            READY) log "reusing slice $name (READY)" ;;
            *) log "slice $name is $state: re-creating it"; delete_slice; create_slice ;;
        esac
    fi
}

on_workers() {  # $1: --worker=all or --worker=0, $2: the command
    run "${tpu[@]}" ssh "$name" "${common[@]}" "$1" --command="$2"
}

# the first install's commit and packages, recorded in the workdir: a later launcher run on the same workdir (the
# launcher itself restarted, or a relaunch after --max-restarts) installs them again, whatever --ref says now
pins_url="$workdir/siim_install.txt"

read_pins() {  # $1: text with siim_pin_commit= / siim_pin_packages= lines
    pinned_commit="$(printf '%s\n' "$1" | sed -n 's/^siim_pin_commit=\([0-9a-f]*\)[[:space:]]*$/\1/p' | head -n 1)"
    pinned_packages="$(printf '%s\n' "$1" | sed -n 's/^siim_pin_packages=\([A-Za-z0-9+/=]*\)[[:space:]]*$/\1/p' | head -n 1)"
    [[ -n $pinned_commit && -n $pinned_packages ]] || pinned_commit="" pinned_packages=""
}

recorded_pins() {  # the workdir's siim_install.txt, if a launch on it installed before
    [[ -z $install_custom && -z $pinned_commit ]] || return 0
    local text
    text="$(query "" gcloud storage cat "$pins_url" "${project_flag[@]}")" || return 0  # none yet (or unreadable: a fresh install)
    read_pins "$text"
    [[ -z $pinned_commit ]] || log "$workdir was started with siim_jax ${pinned_commit:0:12}: installing that commit" \
        "and the same package versions (--ref $ref not used; to install it instead, delete $pins_url)"
}

install() {  # the first time: $install_cmd, reporting what it installed; after that: pinned to it
    recorded_pins
    if [[ -n $pinned_commit ]]; then
        on_workers --worker=all "$(pinned_install_cmd)" || die "installing siim_jax on the workers of $name failed"
        return
    fi
    local out status=0
    out="$(mktemp)"
    on_workers --worker=all "$install_cmd" > "$out" || status=$?
    grep -v '^siim_pin_' "$out" || true
    [[ $status -eq 0 ]] || { rm -f "$out"; die "installing siim_jax on the workers of $name failed"; }
    read_pins "$(grep '^siim_pin_' "$out")"
    rm -f "$out"
    [[ -n $pinned_commit ]] || return 0
    log "installed siim_jax ${pinned_commit:0:12}; a re-created slice gets this commit and these package versions" \
        "again (recorded in $pins_url)"
    printf 'siim_pin_commit=%s\nsiim_pin_packages=%s\n' "$pinned_commit" "$pinned_packages" \
        | run gcloud storage cp - "$pins_url" "${project_flag[@]}" \
        || log "warning: could not write $pins_url; a later launcher run on this workdir installs --ref afresh"
}

start() {
    on_workers --worker=all "$start_cmd" || die "starting the training on the workers of $name failed"
}

stream() {  # returns when worker 0's training ends or the connection drops; $1: the tail command
    run "${tpu[@]}" ssh "$name" "${common[@]}" --worker=0 --ssh-flag=-oServerAliveInterval=30 \
        --ssh-flag=-oServerAliveCountMax=6 --command="${1:-$stream_cmd}" || true
}

combine_status() {  # the slice's status from every worker's: the first crash (killed by a signal: > 128; the
    # others then fail for lack of it, and a restart resumes), else the first failure (not 0 or 75), else none
    # while a worker still runs, else lost when a worker lost its run, else 75 when one stopped resumably, else 0
    local s crashed="" failed="" running="" lost="" stopped=""
    [[ $# -gt 0 ]] || return 0
    for s in "$@"; do
        case "$s" in
            0) ;;
            75) stopped=75 ;;
            none) running=none ;;
            lost) lost=lost ;;
            1[3-9][0-9] | 2[0-9][0-9]) [[ -n $crashed ]] || crashed="$s" ;;
            *) [[ -n $failed ]] || failed="$s" ;;
        esac
    done
    printf '%s\n' "${crashed:-${failed:-${running:-${lost:-${stopped:-0}}}}}"
}

exit_status() {  # every worker's exit status, combined; "" when a worker cannot be reached
    local out
    out="$(query siim_status=0 "${tpu[@]}" ssh "$name" "${common[@]}" --worker=all --command="$status_cmd" \
        && echo siim_reached)"
    [[ $out == *siim_reached* ]] || return 0
    # shellcheck disable=SC2046  # one word per worker
    combine_status $(sed -n 's/^siim_status=\([0-9a-z]*\)[[:space:]]*$/\1/p' <<< "$out")
}

report_done() {
    note "finished: checkpoints in $workdir/checkpoints, metrics in $workdir/metrics.jsonl," \
        "TensorBoard logs in $workdir/tensorboard"
    if [[ $delete_when_done == 1 ]]; then
        delete_slice
    else
        note "the slice is still up (and billed); delete it with:"
        if [[ $mode == queued* ]]; then
            note "$(show "${qr[@]}" delete "$name" "${common[@]}" --force --quiet | cut -c3-)"
        else
            note "$(show "${tpu[@]}" delete "$name" "${common[@]}" --quiet | cut -c3-)"
        fi
    fi
}

# ---------------------------------------------------------------------------------------------- sequence
note "siim_jax on TPU VM slice $name ($accel, $mode, $zone, runtime $runtime), workdir $workdir, config $config, launch id $launch_id"
ensure_slice
install
start

restarts=0
unreachable=0
tail_cmd="$stream_cmd"
while :; do
    stream "$tail_cmd"
    tail_cmd="$stream_cmd"
    status="$(exit_status)"
    state=READY
    if [[ $dry_run == 0 && ! $status =~ ^[0-9]+$ || $status =~ ^(75|1[3-9][0-9]|2[0-9][0-9])$ ]]; then
        state="$(node_state "")"
    fi
    if [[ $status == none && $state == READY ]]; then  # still running: the log stream dropped; reattach
        unreachable=0
        log "log stream ended, training still running: reattaching"
        tail_cmd="$reattach_cmd"
        sleep "$((poll_seconds < 5 ? poll_seconds : 5))"
        continue
    fi
    if [[ -z $status && $state == READY || $state == UNKNOWN ]]; then  # no answer, slice not known gone: retry
        unreachable=$((unreachable + 1))
        [[ $unreachable -lt 10 ]] || die "the workers of $name have not answered 10 times in a row; the training may still be running"
        log "a worker of $name did not answer; retrying in $poll_seconds s"
        sleep "$poll_seconds"
        continue
    fi
    unreachable=0
    if [[ $dry_run == 1 ]]; then
        note "exit status 0:"
        report_done
        note "resume cycle, shown once (repeated up to --max-restarts=$max_restarts times): on exit status 75 with the" \
            "slice still READY only the start step reruns; on a preempted slice (state PREEMPTED / not READY):"
        node_state PREEMPTED > /dev/null
        delete_slice
        create_slice
        install
        start
        stream
        exit_status > /dev/null
        note "the same command on the same workdir: the run resumes from the newest checkpoint in $workdir/checkpoints"
        exit 0
    fi
    case "$status" in
        0) report_done; exit 0 ;;
        75 | none | lost | "")  # stopped resumably, or the slice (or a worker) went away under it
            if [[ $restarts -ge $max_restarts ]]; then
                log "stopped after $restarts restarts (--max-restarts); resumable: rerun the same command"
                exit 75
            fi
            restarts=$((restarts + 1))
            if [[ $state == READY && ($status == 75 || $status == lost) ]]; then
                log "training stopped (exit status ${status/lost/unknown, a worker restarted}) on a READY slice:" \
                    "restarting it ($restarts/$max_restarts)"
                start
            else
                log "slice $name is ${state:-gone} (preempted): re-creating it and resuming ($restarts/$max_restarts)"
                delete_slice
                create_slice
                install
                start
            fi ;;
        1[3-9][0-9] | 2[0-9][0-9])  # a worker crashed (killed by a signal, aborted): resumable from the workdir
            if [[ $restarts -ge $max_restarts ]]; then
                log "a worker crashed (exit status $status) after $restarts restarts (--max-restarts); rerun the same command to resume"
                exit "$status"
            fi
            restarts=$((restarts + 1))
            if [[ $state == READY ]]; then
                log "a worker crashed (exit status $status, killed by signal $((status - 128))) on a READY slice:" \
                    "restarting the training ($restarts/$max_restarts)"
                start
            else
                log "a worker crashed (exit status $status) and slice $name is ${state:-gone}: re-creating it and resuming ($restarts/$max_restarts)"
                delete_slice
                create_slice
                install
                start
            fi ;;
        *)
            log "training failed with exit status $status; see ~/siim_train.log on each worker" \
                "(gcloud compute tpus tpu-vm ssh $name --zone=$zone --worker=all --command='tail -n 20 ~/siim_train.log')"
            exit "$status" ;;
    esac
done
