# Counting of test/run_all.sh, sourced by it and by test/run_all.test.ts
# (which feeds it truncated, missing and inconsistent reports). Each count_*
# function adds one suite's report to the totals. The rule: a suite counts as
# passed only through a report that parses whole and agrees with the suite's
# exit code. A report that is missing, empty or does not parse, and a suite
# that exited non-zero without a failing test (crashed, killed, timed out,
# collected nothing), each count as one failure, named in `failures`. A suite
# that could not run for a reason outside the project (the NFS suite's exit
# 77) and every skipped test count as skipped and are named on the line
# before the summary line, so a skip never reads like a pass. Failed tests and
# suites are named on a line of their own above that, so a log cut to its last
# lines (what CI keeps) still says what failed.
#
# Needs: node (jest reports) and a Python 3 with the standard library (JUnit
# reports; COUNT_PYTHON, default .venv/bin/python where present, else python3).

passed=0
failed=0
skipped=0
failures=()
skip_names=()
fail_names=()

# fail_suite <why>: one failure that is not a failing test.
fail_suite() {
  failed=$((failed + 1))
  failures+=("$1")
  echo "counted as a failure: $1"
}

# add_counts <suite> <rc> <counts line> [names...]: checks that the counts
# are three non-negative integers before adding them (an empty or odd line is
# an unparsable report), then applies the exit-code rule. Each name is
# "skip <test>" or "fail <test>".
add_counts() {
  local suite=$1 rc=$2 line=$3 p f s n
  shift 3
  if ! [[ $line =~ ^([0-9]+)\ ([0-9]+)\ ([0-9]+)$ ]]; then
    fail_suite "$suite: report does not parse"
    return
  fi
  p=${BASH_REMATCH[1]} f=${BASH_REMATCH[2]} s=${BASH_REMATCH[3]}
  passed=$((passed + p))
  failed=$((failed + f))
  skipped=$((skipped + s))
  for n in "$@"; do
    case $n in
      "skip "*) skip_names+=("${n#skip }") ;;
      "fail "*) fail_names+=("$suite: ${n#fail }") ;;
    esac
  done
  if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then fail_suite "$suite: exited $rc without a failing test"; fi
  if [ "$rc" -eq 0 ] && [ $((p + f + s)) -eq 0 ]; then fail_suite "$suite: ran no test"; fi
}

# count_junit <suite> <xml> <rc>: a pytest JUnit report.
count_junit() {
  local suite=$1 xml=$2 rc=$3 py=${COUNT_PYTHON:-} out
  if [ ! -s "$xml" ]; then
    fail_suite "$suite: no report ($xml missing or empty; exit $rc)"
    return
  fi
  if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
  fi
  # First line: passed failed skipped; then "skip <name>" or "fail <name>" for each such test.
  out=$("$py" - "$xml" <<'PY' 2>/dev/null
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
if root.tag not in ("testsuite", "testsuites") or not suites:
    sys.exit(1)
t = sum(int(s.get("tests", 0)) for s in suites)
bad = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skip = sum(int(s.get("skipped", 0)) for s in suites)
if min(t, bad, skip, t - bad - skip) < 0:
    sys.exit(1)
print(t - bad - skip, bad, skip)
for s in suites:
    for case in s.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("skipped") is not None:
            print(f"skip {name}")
        elif case.find("failure") is not None or case.find("error") is not None:
            print(f"fail {name}")
PY
  ) || out=""
  local names=()
  mapfile -t names < <(printf '%s\n' "$out" | tail -n +2 | sed '/^$/d')
  add_counts "$suite" "$rc" "$(printf '%s\n' "$out" | head -1)" "${names[@]}"
}

# count_jest <suite> <json> <rc>: a jest --json report. A test file that
# failed to run (no assertion results) counts as a failure of its own.
count_jest() {
  local suite=$1 json=$2 rc=$3 out
  if [ ! -s "$json" ]; then
    fail_suite "$suite: no report ($json missing or empty; exit $rc)"
    return
  fi
  out=$(node -e '
    const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
    const n = [r.numPassedTests, r.numFailedTests, r.numPendingTests, r.numTodoTests];
    if (!Array.isArray(r.testResults) || !n.every(Number.isInteger)) process.exit(1);
    const broken = r.testResults.filter((t) => t.status === "failed" && t.assertionResults.length === 0).length;
    console.log(n[0], n[1] + broken, n[2] + n[3]);
    for (const t of r.testResults) {
      if (t.status === "failed" && t.assertionResults.length === 0)
        console.log(`fail ${require("path").basename(t.name)} (did not run: ${(t.message || "").split("\n").find((l) => l.trim()) || "no message"})`);
      for (const a of t.assertionResults)
        if (a.status === "pending" || a.status === "todo" || a.status === "failed")
          console.log(`${a.status === "failed" ? "fail" : "skip"} ${require("path").basename(t.name)} ${a.fullName}`);
    }
  ' "$json" 2>/dev/null) || out=""
  local names=()
  mapfile -t names < <(printf '%s\n' "$out" | tail -n +2 | sed '/^$/d')
  add_counts "$suite" "$rc" "$(printf '%s\n' "$out" | head -1)" "${names[@]}"
}

# count_nfs <log> <rc>: test/nfs/run.sh's output, which ends with its own
# "N passed, N failed[, N skipped]". Exit 77 with "NFS suite skipped: <why>"
# is a named skip of the whole suite.
count_nfs() {
  local log=$1 rc=$2 line
  if [ "$rc" -eq 77 ]; then
    skipped=$((skipped + 1))
    skip_names+=("NFS suite: $(grep -m1 '^NFS suite skipped: ' "$log" | cut -d' ' -f4-)")
    return
  fi
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed(, [0-9]+ skipped)?$' "$log" | tail -1)
  if [ -z "$line" ]; then
    fail_suite "NFS suite: no count line (exit $rc)"
    return
  fi
  local names=()
  mapfile -t names < <(sed -n -E 's/^  failed: (.*)$/fail \1/p' "$log")
  add_counts "NFS suite" "$rc" "$(echo "$line" | sed -E 's/^([0-9]+) passed, ([0-9]+) failed(, ([0-9]+) skipped)?$/\1 \2 \4/; s/ $/ 0/')" "${names[@]}"
}

# summary_line: a line "skipped: <what>; <what>" naming every skipped test
# and suite (when any), then the last line "N passed, N failed", with
# ", N skipped" when tests were skipped: a plain count line for CI to read.
summary_line() {
  local line="${passed} passed, ${failed} failed" names="" all=()
  all=("${fail_names[@]}" "${failures[@]}")
  if [ ${#all[@]} -gt 0 ]; then
    # At most 20 names of 300 characters: the line is for finding the failure, the log above has the rest.
    names=$(printf '%.300s; ' "${all[@]:0:20}")
    [ ${#all[@]} -gt 20 ] && names+="and $((${#all[@]} - 20)) more; "
    echo "failed: ${names%; }"
  fi
  if [ "$skipped" -gt 0 ]; then
    line+=", ${skipped} skipped"
    if [ ${#skip_names[@]} -gt 0 ]; then
      names=$(printf '%s; ' "${skip_names[@]}")
      echo "skipped: ${names%; }"
    fi
  fi
  echo "$line"
}
