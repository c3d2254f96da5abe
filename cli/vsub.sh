#!/bin/sh
# vsub: the user's command. A job without a VM goes to the site's qsub from here, with builtins only (no
# Python, no other program): exec "$qsub" "$@". Only a VM job, --dry-run/-gf, --help/--man or anything this
# front is unsure of starts the Python vsub (vtorque-vsub), which decides exactly as below (cli/vsub.py:
# split_args, is_vm_script, qsub_binary) and says why when it refuses.
#
# Options end at the first argument that is neither an option nor an option's value: the script (on a Slurm
# site -wd and -pe take values too). A VM job has -vm VALUE or -vm=VALUE before the script, or a
# "<prefix> -vm" line in its script's leading comment block (prefix: the last -C value, else $PBS_DPREFIX,
# else #PBS; an empty prefix means no directives, as for qsub). A script piped on stdin is read here (it
# must be read to be seen) and handed on byte for byte; a terminal or a device on stdin is qsub's to read.
#
# The site's qsub is [scheduler] in the vtorque config ($VTORQUE_CONFIG, else /etc/vtorque/vtorque.toml):
# `qsub`, else `bin_dir`/qsub, else /usr/local/bin/qsub (kind = "torque") or /usr/bin/qsub (kind = "slurm");
# VTORQUE_SCHEDULER__QSUB/__BIN_DIR/__KIND override the file. Anything in the config this front does not
# read plainly (multi-line strings, escapes, dotted or inline scheduler keys) goes to Python.
# Install: as `vsub` beside `vtorque-vsub` (the venv's bin); VTORQUE_VSUB_PY names another Python vsub.

nl='
'

python_vsub() {
  p=${VTORQUE_VSUB_PY:-${0%/*}/vtorque-vsub}
  if [ ! -x "$p" ]; then
    p=$(command -v vtorque-vsub) || {
      echo "vsub: the Python vsub (vtorque-vsub) is neither beside ${0} nor on PATH; install cli/vsub.sh beside it" >&2
      exit 2
    }
  fi
  if [ -n "${buffered-}" ]; then
    exec "$p" "$@" <<VTORQUE_STDIN_END
$buf
VTORQUE_STDIN_END
  fi
  exec "$p" "$@"
}

# -- the site's qsub, from [scheduler] ------------------------------------------------------------------
cfg=${VTORQUE_CONFIG-/etc/vtorque/vtorque.toml}
kind=torque bindir= qsub=
[ -n "${VTORQUE_SCHEDULER+x}" ] && python_vsub "$@"
if [ -f "$cfg" ] && [ -r "$cfg" ]; then
  sect=
  while IFS= read -r l || [ -n "$l" ]; do
    l=${l#"${l%%[![:space:]]*}"}
    case $l in
      *'"""'*|*"'''"*) python_vsub "$@" ;;
      '[['*) sect=array ;;
      '['*)
        [ "$sect" = scheduler ] && break  # past [scheduler]: nothing after it can name the qsub
        sect=${l#\[}; sect=${sect%%]*}
        sect=${sect#"${sect%%[![:space:]]*}"}; sect=${sect%"${sect##*[![:space:]]}"}
        case $sect in scheduler) ;; scheduler*|*[\"\']*) python_vsub "$@" ;; esac ;;
      scheduler*|[\"\']*)
        [ -z "$sect" ] && python_vsub "$@"
        [ "$sect" = scheduler ] && python_vsub "$@" ;;
      *=*)
        [ "$sect" = scheduler ] || continue
        k=${l%%=*}; k=${k%"${k##*[![:space:]]}"}
        case $k in kind|bin_dir|qsub) ;; *) continue ;; esac
        v=${l#*=}; v=${v#"${v%%[![:space:]]*}"}
        case $v in
          \"*) v=${v#\"}; case ${v%%\"*} in *\\*) python_vsub "$@" ;; esac; v=${v%%\"*} ;;
          \'*) v=${v#\'}; v=${v%%\'*} ;;
          *) python_vsub "$@" ;;
        esac
        case $k in kind) kind=$v ;; bin_dir) bindir=$v ;; qsub) qsub=$v ;; esac ;;
    esac
  done < "$cfg"
elif [ -n "${VTORQUE_CONFIG+x}" ] || [ -e "$cfg" ]; then
  python_vsub "$@"  # a named config that is missing or unreadable: Python says so
fi
kind=${VTORQUE_SCHEDULER__KIND-$kind}
bindir=${VTORQUE_SCHEDULER__BIN_DIR-$bindir}
qsub=${VTORQUE_SCHEDULER__QSUB-$qsub}
case $kind in
  torque) dflt=/usr/local/bin ;;
  slurm) dflt=/usr/bin ;;
  *) python_vsub "$@" ;;
esac
qsub=${qsub:-${bindir:-$dflt}/qsub}

# -- the arguments: qsub's, as cli/vsub.py split_args reads them ------------------------------------------
pfx=${PBS_DPREFIX-#PBS}
script= have_script= skip=0 want_pfx=
for a do
  if [ "$skip" -gt 0 ]; then
    skip=$((skip - 1))
    [ -n "$want_pfx" ] && pfx=$a want_pfx=
    continue
  fi
  case $a in
    -vm|-vm=*|--dry-run|-gf|--help|--man) python_vsub "$@" ;;
    -C) skip=1 want_pfx=1 ;;
    -C?*) pfx=${a#-C} ;;
    -[aAbcdDeFjJkKlLmMNopPqrStuvwW]) skip=1 ;;
    -wd) [ "$kind" = slurm ] && skip=1 ;;  # slurm-wlm-torque's -wd DIR, -pe shm N (Torque: -w d, -p e)
    -pe) [ "$kind" = slurm ] && skip=2 ;;
    -?*) ;;
    *) script=$a have_script=1; break ;;
  esac
done
[ -n "$want_pfx" ] && python_vsub "$@"  # -C without its value: qsub's usage error, in vsub's words

# -- the job script's leading block: a "<prefix> -vm" line makes a VM job ---------------------------------
vm=
scan() {
  [ -n "$pfx" ] || return 0
  while IFS= read -r l || [ -n "$l" ]; do
    case $l in *[![:space:]]*) ;; *) continue ;; esac
    case ${l#"${l%%[![:space:]]*}"} in '#'*) ;; *) return 0 ;; esac
    case $l in
      "$pfx"[[:space:]]*)
        r=${l#"$pfx"}
        case ${r#"${r%%[![:space:]]*}"} in -vm|-vm[[:space:]]*) vm=1; return 0 ;; esac ;;
    esac
  done
}

if [ -n "$have_script" ] && [ "$script" != - ]; then
  [ -f "$script" ] && [ -r "$script" ] && scan < "$script"
elif [ -t 0 ] || [ -c /dev/stdin ] || [ ! -e /dev/stdin ]; then
  :  # a terminal, a device or no stdin at all: qsub reads it itself
elif [ -f /dev/stdin ]; then
  scan < /dev/stdin  # a fresh open of the file: qsub still reads it from the start
else
  # A pipe: read it all (qsub gets every byte back on its stdin), then look at its leading block.
  buf= l=
  while IFS= read -r l; do buf=$buf$l$nl; done
  buf=$buf$l
  buffered=1
  scan <<VTORQUE_STDIN_END
$buf
VTORQUE_STDIN_END
  buf=${buf%"$nl"}
fi
[ -n "$vm" ] && python_vsub "$@"

if [ ! -x "$qsub" ] || [ -d "$qsub" ]; then
  echo "vsub: the site's qsub $qsub is not an executable file ([scheduler] in $cfg)" >&2
  exit 2
fi
if [ -n "${buffered-}" ]; then
  exec "$qsub" "$@" <<VTORQUE_STDIN_END
$buf
VTORQUE_STDIN_END
fi
exec "$qsub" "$@"
