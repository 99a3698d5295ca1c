#!/bin/sh
# vpmfs-crash end to end on real mounts: the careless writer is caught under writeback and its
# printed replay reproduces the failure; the careful one passes; under kill both pass; the same
# state is the same image bit for bit; --json parses; --bisect names a point; usage errors exit 2.
# Usage: crash_tool_test.sh BIN_DIR SOURCE_DIR
set -u
BIN=$1
EX=$(cd "$2" && pwd)/examples/crash
CRASH=$BIN/vpmfs-crash
W=$(mktemp -d /dev/shm/vpmfs-crash-test.XXXXXX)
trap 'for m in "$W"/m "$W"/*.mnt; do fusermount3 -u -z "$m" 2>/dev/null; done; sleep 0.2; rm -rf "$W"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
CHECK="sh $EX/check.sh"

# Careless under writeback: caught, with a replay line.
"$CRASH" run --states 12 --trace "$W/careless.trace" --json "$W/r.json" --bisect \
  --check "$CHECK" -- sh "$EX/careless.sh" > "$W/out" 2> "$W/err"
rc=$?
cat "$W/out"
[ $rc = 1 ] || fail "careless under writeback: exit $rc, want 1"
grep -q '^FAIL point' "$W/out" || fail "no FAIL line"
grep -q 'replay: .*vpmfs-crash replay' "$W/out" || fail "no replay line"
grep -q '^bisect: first failing crash point' "$W/out" || fail "no bisect line"
python3 -c "import json,sys; j=json.load(open('$W/r.json')); assert j['failed']>0 and len(j['states'])==12 and 'bisect' in j" \
  || fail "json"
# The printed replay reproduces the failure.
line=$(grep -m1 'replay: ' "$W/out" | sed 's/^ *replay: //; s/ --image [^ ]*//; s/ --mount [^ ]*//')
mkdir "$W/m"
$line --image "$W/rep.img" --mount "$W/m" --check "$CHECK" > "$W/rep.out" 2>&1
rc=$?
[ $rc = 1 ] || { cat "$W/rep.out"; fail "replay did not reproduce the failure (exit $rc)"; }
# The printed command as is leaves the state mounted in the working directory.
full=$(grep -m1 'replay: ' "$W/out" | sed 's/^ *replay: //')
(cd "$W" && $full > /dev/null) || fail "printed replay command"
mnt=$(ls -d "$W"/vpmfs-crash-*.mnt)
grep -q " $mnt fuse.vpmfs " /proc/mounts || fail "printed replay did not leave $mnt mounted"
fusermount3 -u "$mnt" || fail "unmount $mnt"
# Determinism: the same state twice, bit for bit.
$line --image "$W/a.img" > /dev/null || fail "replay a"
$line --image "$W/b.img" > /dev/null || fail "replay b"
cmp -s "$W/a.img" "$W/b.img" || fail "two replays of one state differ"
# The same trace under kill: the careless program keeps what it acknowledged.
"$CRASH" states "$W/careless.trace" --model kill --states 12 --check "$CHECK" > "$W/out" 2>&1 \
  || { cat "$W/out"; fail "careless under kill"; }
# Careful under writeback and kill.
for m in writeback kill; do
  "$CRASH" run --model $m --states 12 --check "$CHECK" -- sh "$EX/careful.sh" > "$W/out" 2>&1 \
    || { cat "$W/out"; fail "careful under $m"; }
done
# Under direct (recorded with sync_dax=direct): the same verdicts as under writeback.
"$CRASH" run --model direct --states 10 --check "$CHECK" -- sh "$EX/careful.sh" > "$W/out" 2>&1 \
  || { cat "$W/out"; fail "careful under direct"; }
"$CRASH" run --model direct --states 10 --trace "$W/direct.trace" --check "$CHECK" \
  -- sh "$EX/careless.sh" > "$W/out" 2>&1
[ $? = 1 ] || { cat "$W/out"; fail "careless under direct not caught"; }
# SQLite in WAL mode with synchronous=FULL keeps every committed row.
if command -v sqlite3 > /dev/null; then
  # Exit 3 is "could not run" (a mount or a file that could not be made), not a verdict: one
  # such failure was seen once under a loaded CI run; it is shown and the run tried again.
  for try in 1 2; do
    "$CRASH" run --states 10 --check "sh $EX/sqlite_check.sh" -- env ROWS=10 sh "$EX/sqlite.sh" \
      > "$W/out" 2>&1
    rc=$?
    [ $rc = 3 ] && [ $try = 1 ] && { cat "$W/out"; continue; }
    [ $rc = 0 ] || { cat "$W/out"; fail "sqlite (exit $rc)"; }
    break
  done
fi
# Usage errors.
"$CRASH" run --check true > /dev/null 2>&1; [ $? = 2 ] || fail "missing workload: want exit 2"
"$CRASH" run --model bogus --check true -- true > /dev/null 2>&1; [ $? = 2 ] || fail "bad model"
"$CRASH" states "$W/careless.trace" --model direct --check true > /dev/null 2>&1
[ $? = 2 ] || fail "direct model on a writeback trace: want exit 2"
echo PASS
