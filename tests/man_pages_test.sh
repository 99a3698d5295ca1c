#!/usr/bin/env bash
# Every tool that has both a built binary in BIN_DIR and a page in MAN_DIR: the page must
# render without a roff warning and name every option the tool's --help lists (its
# subcommands' too, and for vpmfs every mount option).
#
#   tests/man_pages_test.sh BIN_DIR MAN_DIR
set -uo pipefail
bin_dir=$1
man_dir=$2
status=0
checked=0

fail() {
  echo "FAIL: $*" >&2
  status=1
}

# Option names in --help text: -x and --long-name in the Options section, and for a
# "Mount options" section the names at the start of its lines (sync_dax=..., ro, rw).
options_of() {
  awk '
    /^[A-Z].*:$/ { section = $0; next }
    section == "Options:" {
      line = $0
      while (match(line, /(^|[ ,])--?[A-Za-z][A-Za-z0-9-]*/)) {
        opt = substr(line, RSTART, RLENGTH); sub(/^[ ,]/, "", opt); print opt
        line = substr(line, RSTART + RLENGTH)
      }
    }
    section ~ /^Mount options/ && /^  [a-z_]/ {
      for (i = 1; i <= NF; i++) {   # the first column: "ro, rw", "commit=SECONDS"
        w = $i; sub(/[=,].*/, "", w); print w
        if ($i !~ /,$/) break
      }
    }
    section == "Subcommands:" && /^  [a-z]/ { print "SUBCOMMAND " $1 }
  '
}

for page in "$man_dir"/*.8; do
  tool=$(basename "$page" .8)
  [[ -x "$bin_dir/$tool" ]] || continue
  checked=$((checked + 1))
  before=$status
  status=0
  warnings=$(groff -man -ww -z "$page" 2>&1)
  [[ -z "$warnings" ]] || fail "$page: groff warnings: $warnings"
  warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
  [[ -z "$warnings" ]] || fail "$page: man warnings: $warnings"
  # Plain ASCII, no hyphenation, long lines: "\-" becomes "-" and no name is split.
  text=$(groff -man -Tascii -rHY=0 -rLL=300n "$page" 2>/dev/null | col -b)

  helps=("$("$bin_dir/$tool" --help)")
  while read -r _ sub; do
    helps+=("$("$bin_dir/$tool" "$sub" --help)")
    grep -qE "(^|[^a-z-])$sub([^a-z-]|$)" <<<"$text" || fail "$page: subcommand $sub is missing"
  done < <(options_of <<<"${helps[0]}" | grep '^SUBCOMMAND ')
  opts=$(for h in "${helps[@]}"; do options_of <<<"$h"; done | grep -v '^SUBCOMMAND ' | sort -u)
  [[ -n "$opts" ]] || fail "$tool --help lists no options (parse error?)"
  for opt in $opts; do
    grep -qE -- "(^|[^A-Za-z0-9_-])${opt}([^A-Za-z0-9_-]|$)" <<<"$text" ||
      fail "$page: $tool's option $opt is missing"
  done
  ((status)) || echo "$tool: $(wc -w <<<"$opts") options, all in $page"
  ((status |= before))
done

((checked > 0)) || fail "no tool in $bin_dir has a page in $man_dir"
exit $status
