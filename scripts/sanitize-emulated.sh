#!/usr/bin/env bash
# The emulated kernel checks (tests/emulated/kernels.cpp) under the compiler's sanitizers, as CPU
# stand-ins for compute-sanitizer: AddressSanitizer with UndefinedBehaviorSanitizer for memcheck,
# on the full shapes, and ThreadSanitizer for racecheck, on the reduced shapes (BARLOW_EMU_REDUCED),
# since every emulated GPU thread is an OS thread and TSan makes each one slow. Controls run first:
# builds with a planted race and a planted out-of-bounds read (tests/emulated/sanitizer_controls.cpp)
# must be reported, so a clean run shows the sanitizers were looking.
# Exit status is non-zero if a control goes unreported, a sanitizer reports anything, or a check
# fails.
#
#   scripts/sanitize-emulated.sh [--controls]   (--controls: the controls only)
#   env: CXX (default c++). Debian's g++-12 brings the runtimes (libasan8, libubsan1, libtsan2,
#        liblsan0) through libgcc-12-dev.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

only_controls=0
case "${1:-}" in
  "") ;;
  --controls) only_controls=1 ;;
  *) echo "usage: $0 [--controls]" >&2; exit 2 ;;
esac

cxx=${CXX:-c++}
flags=(-std=c++20 -O1 -g -fno-omit-frame-pointer -pthread -DBARLOW_HOST_EMULATION
       -I kernels -I tests/emulated)
asan=(-fsanitize=address,undefined -fno-sanitize-recover=all)
tsan=(-fsanitize=thread)
# Our defaults first, so options already in the environment override them.
export ASAN_OPTIONS="detect_leaks=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export TSAN_OPTIONS="halt_on_error=0:second_deadlock_stack=1${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
reported='(Address|Leak|Thread|UndefinedBehavior)Sanitizer|runtime error:'

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0

# gcc 12's runtimes predate the 32-bit mmap randomization newer kernels allow: TSan stops with
# "unexpected memory mapping" and ASan can spin on DEADLYSIGNAL. With ASLR off both run.
norand=()
if [ "$(cat /proc/sys/vm/mmap_rnd_bits 2>/dev/null || echo 0)" -gt 28 ]; then
  norand=(setarch "$(uname -m)" -R)
fi

# build NAME SOURCE FLAGS...: compiles $work/NAME, or stops the script.
build() {
  local name=$1 src=$2 t0=$SECONDS
  shift 2
  if ! "$cxx" "${flags[@]}" "$@" "$src" -o "$work/$name" 2>"$work/$name.build"; then
    sed 's/^/  /' "$work/$name.build" | head -40
    echo "FAIL build $name ($cxx ${*}); if the sanitizer runtimes are missing, on Debian:" \
      "apt-get install g++-12 (libasan8 libubsan1 libtsan2 liblsan0)"
    exit 1
  fi
  echo "     built $name in $((SECONDS - t0)) s"
}

# run NAME: runs $work/NAME, its output into $work/NAME.out and .err, its status into $rc.
run() {
  local t0=$SECONDS
  "${norand[@]}" "$work/$1" >"$work/$1.out" 2>"$work/$1.err"
  rc=$?
  if [ ${#norand[@]} -eq 0 ] && grep -q 'unexpected memory mapping' "$work/$1.err"; then
    echo "     $1: ThreadSanitizer cannot map its shadow memory under this ASLR; again with it off"
    norand=(setarch "$(uname -m)" -R)
    "${norand[@]}" "$work/$1" >"$work/$1.out" 2>"$work/$1.err"
    rc=$?
  fi
  echo "     ran $1 in $((SECONDS - t0)) s (exit $rc)"
}

# control NAME MACRO PATTERN FLAGS...: the planted bug must give a sanitizer report matching PATTERN.
control() {
  local name=$1 macro=$2 pattern=$3
  shift 3
  build "$name" tests/emulated/sanitizer_controls.cpp "-D$macro" "$@"
  run "$name"
  if [ "$rc" -ne 0 ] && grep -qE "$pattern" "$work/$name.err"; then
    echo "ok   control $name reported: $(grep -m1 '^SUMMARY: ' "$work/$name.err")"
  else
    echo "FAIL control $name: the sanitizer did not report the planted bug (exit $rc)"
    cat "$work/$name.out" "$work/$name.err" | sed 's/^/  /' | head -60
    failed=1
  fi
}

# checks NAME FLAGS...: the kernel checks must pass with nothing reported.
checks() {
  local name=$1
  shift
  build "$name" tests/emulated/kernels.cpp "$@"
  run "$name"
  local summary
  summary=$(grep -E '^[0-9]+ checks, [0-9]+ failed$' "$work/$name.out")
  if [ "$rc" -eq 0 ] && [[ "$summary" == *" 0 failed" ]] && ! grep -qE "$reported" "$work/$name.err"; then
    echo "ok   $name: $summary, no sanitizer reports"
  else
    echo "FAIL $name: ${summary:-no check summary} (exit $rc)"
    grep -v '^ok ' "$work/$name.out" | sed 's/^/  /' | head -40
    sed 's/^/  /' "$work/$name.err" | head -150
    failed=1
  fi
}

control race BARLOW_CONTROL_RACE 'SUMMARY: ThreadSanitizer: data race .*block_sum' "${tsan[@]}"
control overflow BARLOW_CONTROL_OVERFLOW \
  'SUMMARY: AddressSanitizer: heap-buffer-overflow .*naive_mul' "${asan[@]}"
if [ "$only_controls" -eq 0 ]; then
  checks asan-ubsan "${asan[@]}"
  checks tsan -DBARLOW_EMU_REDUCED "${tsan[@]}"
fi
exit "$failed"
