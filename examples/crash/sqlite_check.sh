#!/bin/sh
# The database passes PRAGMA integrity_check and holds at least the rows committed before the
# crash point (the last "committed N" line in $VPMFS_ACKED).
want=$(sed -n 's/^committed //p' "$VPMFS_ACKED" | tail -n 1)
want=${want:-0}
if [ ! -e "$VPMFS_MNT/app.db" ]; then
  [ "$want" = 0 ] && { echo "no database yet, nothing committed"; exit 0; }
  echo "database missing, $want rows committed"; exit 1
fi
ok=$(sqlite3 "$VPMFS_MNT/app.db" "PRAGMA integrity_check;" 2>&1 | head -n 1)
[ "$ok" = ok ] || { echo "integrity_check: $ok"; exit 1; }
have=$(sqlite3 "$VPMFS_MNT/app.db" "SELECT count(*) FROM t;" 2>/dev/null || echo 0)
[ "$have" -ge "$want" ] || { echo "$have rows, $want committed"; exit 1; }
echo "ok: $have rows, $want committed"
