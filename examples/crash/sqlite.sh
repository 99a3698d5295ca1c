#!/bin/sh
# SQLite in WAL mode with synchronous=FULL: after each committed transaction, print the count.
set -e
sqlite3 app.db "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v TEXT);" > /dev/null
for i in $(seq 1 ${ROWS:-20}); do
  sqlite3 app.db "PRAGMA synchronous=FULL; INSERT INTO t(v) VALUES (hex(randomblob(200)));"
  echo "committed $i"
done
