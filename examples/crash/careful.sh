#!/bin/sh
# Writes each file, fsyncs it, renames it, fsyncs the directory, then announces "done".
for i in 1 2 3 4 5 6 7 8; do
  head -c 20000 /dev/zero | tr '\0' "$i" > "file$i.tmp"
  sync "file$i.tmp"
  mv "file$i.tmp" "file$i"
  sync .
  echo "done file$i"
done
