#!/bin/sh
# Writes files and announces each "done" without fsync: a power cut can lose them.
for i in 1 2 3 4 5 6 7 8; do
  head -c 20000 /dev/zero | tr '\0' "$i" > "file$i.tmp"
  mv "file$i.tmp" "file$i"
  echo "done file$i"
done
