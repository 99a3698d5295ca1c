#!/bin/sh
# Every file the workload announced "done" exists in $VPMFS_MNT with its full content.
status=0
while read -r word name; do
  [ "$word" = done ] || continue
  i=${name#file}
  want=$(head -c 20000 /dev/zero | tr '\0' "$i" | cksum)
  if [ ! -f "$VPMFS_MNT/$name" ]; then
    echo "MISSING $name"; status=1
  elif [ "$(cksum < "$VPMFS_MNT/$name")" != "$want" ]; then
    echo "DAMAGED $name"; status=1
  fi
done < "$VPMFS_ACKED"
[ $status = 0 ] && echo "all acknowledged files intact"
exit $status
