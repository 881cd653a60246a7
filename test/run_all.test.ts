// test/run_all.sh's counting (test/counting.sh) fed real reports and broken
// ones: a report cut short by a killed run, a missing one, a suite that
// crashed after a clean report, a suite that could not run at all. None of
// them may add up to "0 failed".
import { spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { tempDir } from "./helpers/fixtures";

const ROOT = path.resolve(__dirname, "..");
const JEST = path.join(ROOT, "node_modules", ".bin", "jest");

// What pytest 8.4 writes with --junitxml for one passed, one failed and one skipped test.
const JUNIT =
  '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="0" failures="1" ' +
  'skipped="1" tests="3" time="0.036" timestamp="2026-12-04T10:13:41.267317+00:00" hostname="vm">' +
  '<testcase classname="test_x" name="test_ok" time="0.001" />' +
  '<testcase classname="test_x" name="test_bad" time="0.001"><failure message="assert 0">E   assert 0</failure></testcase>' +
  '<testcase classname="test_x" name="test_skip" time="0.000"><skipped type="pytest.skip" message="no disk">no disk</skipped></testcase>' +
  "</testsuite></testsuites>";

let dir: string;
let jestReport: string;

beforeAll(() => {
  dir = tempDir("ucm-count-");
  // A real jest report: one test passes, one fails, one is skipped, one is a todo.
  const proj = path.join(dir, "proj");
  fs.mkdirSync(proj);
  fs.writeFileSync(path.join(proj, "package.json"), "{}");
  fs.writeFileSync(path.join(proj, "jest.config.js"), 'module.exports = { testEnvironment: "node" };');
  fs.writeFileSync(
    path.join(proj, "a.test.js"),
    'test("ok", () => {});\ntest("bad", () => expect(1).toBe(2));\ntest.skip("not here", () => {});\ntest.todo("later");\n',
  );
  jestReport = path.join(dir, "jest.json");
  const r = spawnSync(JEST, ["--json", `--outputFile=${jestReport}`], { cwd: proj, encoding: "utf8" });
  expect(r.status).toBe(1);
  fs.writeFileSync(path.join(dir, "pytest.xml"), JUNIT);
}, 60000);

afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

/** Sources test/counting.sh, runs `script` and returns the summary line and the totals. */
function count(script: string) {
  const r = spawnSync(
    "bash",
    ["-c", `set -uo pipefail; source test/counting.sh; ${script}\nsummary_line; echo "TOTALS $passed $failed $skipped"`],
    {
      cwd: ROOT,
      encoding: "utf8",
      env: { ...process.env, COUNT_PYTHON: "python3", D: dir },
    },
  );
  expect(r.stderr).toBe("");
  const lines = r.stdout.trim().split("\n");
  const [, p, f, s] = lines.pop()!.split(" ").map(Number);
  const line = lines.pop()!;
  const named = lines.length && lines[lines.length - 1].startsWith("skipped: ") ? lines.pop()!.slice(9) : "";
  return { line, named, passed: p, failed: f, skipped: s, out: r.stdout };
}

/** `file` cut to `fraction` of its length, as a run killed while writing it leaves it. */
function truncated(file: string, fraction: number): string {
  const data = fs.readFileSync(file);
  const out = `${file}.cut${fraction}`;
  fs.writeFileSync(out, data.subarray(0, Math.floor(data.length * fraction)));
  return out;
}

describe("JUnit reports (pytest)", () => {
  test("a whole report counts its tests and names the skipped one", () => {
    const r = count('count_junit pytest "$D/pytest.xml" 1');
    expect([r.passed, r.failed, r.skipped]).toEqual([1, 1, 1]);
    expect(r.line).toBe("1 passed, 1 failed, 1 skipped");
    expect(r.named).toBe("test_x::test_skip");
    expect(r.out.split("\n")).toContain("failed: pytest: test_x::test_bad");
  });

  test.each([0.25, 0.5, 0.9, 0.99])("a report cut at %p of its length is a failure, whatever the exit code", (fraction) => {
    const cut = truncated(path.join(dir, "pytest.xml"), fraction);
    for (const rc of [0, 1]) {
      const r = count(`count_junit pytest "${cut}" ${rc}`);
      expect(r.failed).toBeGreaterThan(0);
      expect(r.out).toContain("counted as a failure: pytest: report does not parse");
    }
  });

  test("a missing or empty report, and pytest killed before writing one, are failures", () => {
    fs.writeFileSync(path.join(dir, "empty.xml"), "");
    for (const [file, rc] of [
      ["missing.xml", 0],
      ["empty.xml", 0],
      ["missing.xml", 124],
    ] as const) {
      const r = count(`count_junit pytest "$D/${file}" ${rc}`);
      expect(r.line).toBe("0 passed, 1 failed");
      expect(r.out).toMatch(/counted as a failure: pytest: no report/);
    }
  });

  test("a clean report from a run that then exited non-zero (crashed in teardown, timed out) adds one failure", () => {
    const clean = JUNIT.replace('failures="1"', 'failures="0"').replace(/<failure[^]*?<\/failure>/, "");
    fs.writeFileSync(path.join(dir, "clean.xml"), clean);
    const counted = count('count_junit pytest "$D/clean.xml" 0');
    expect(counted.line).toBe("2 passed, 0 failed, 1 skipped");
    expect(counted.named).toBe("test_x::test_skip");
    const r = count('count_junit pytest "$D/clean.xml" 137');
    expect([r.passed, r.failed]).toEqual([2, 1]);
    expect(r.out).toContain("pytest: exited 137 without a failing test");
  });

  test("a report of no test at all is a failure", () => {
    fs.writeFileSync(
      path.join(dir, "none.xml"),
      '<testsuites><testsuite name="pytest" errors="0" failures="0" skipped="0" tests="0"/></testsuites>',
    );
    expect(count('count_junit pytest "$D/none.xml" 0').failed).toBe(1);
    expect(count('count_junit pytest "$D/none.xml" 5').failed).toBe(1);
  });
});

describe("jest reports", () => {
  test("a whole report counts its tests and names the skipped and todo ones", () => {
    const r = count(`count_jest jest "${jestReport}" 1`);
    expect([r.passed, r.failed, r.skipped]).toEqual([1, 1, 2]);
    expect(r.line).toBe("1 passed, 1 failed, 2 skipped");
    expect(r.named).toBe("a.test.js not here; a.test.js later");
    expect(r.out.split("\n")).toContain("failed: jest: a.test.js bad");
  });

  test.each([0.1, 0.5, 0.95])("a report cut at %p of its length is a failure", (fraction) => {
    const cut = truncated(jestReport, fraction);
    for (const rc of [0, 1]) {
      const r = count(`count_jest jest "${cut}" ${rc}`);
      expect(r.failed).toBeGreaterThan(0);
      expect(r.out).toContain("counted as a failure: jest: report does not parse");
    }
  });

  test("a test file that could not run (no assertions in it) is a failure of its own", () => {
    const rep = JSON.parse(fs.readFileSync(jestReport, "utf8"));
    rep.testResults.push({ ...rep.testResults[0], name: "/x/broken.test.ts", status: "failed", assertionResults: [] });
    fs.writeFileSync(path.join(dir, "broken.json"), JSON.stringify(rep));
    const r = count('count_jest jest "$D/broken.json" 1');
    expect(r.failed).toBe(2);
    expect(r.out).toMatch(/^failed: jest: a\.test\.js bad; jest: broken\.test\.ts \(did not run: .*\)$/m);
  });

  test("no report (jest killed by the time limit) is a failure", () => {
    expect(count('count_jest jest "$D/none.json" 124').line).toBe("0 passed, 1 failed");
  });
});

describe("the NFS suite", () => {
  const log = (name: string, text: string) => fs.writeFileSync(path.join(dir, name), text);

  test("exit 77 is a skip of the whole suite, named with its reason in the summary line", () => {
    log(
      "nfs77.log",
      "== NFS guest: installing qemu-system-x86 (apt-get)\nNFS suite skipped: apt-get update failed (package registry unreachable?)\n",
    );
    const r = count('count_nfs "$D/nfs77.log" 77');
    expect([r.passed, r.failed, r.skipped]).toEqual([0, 0, 1]);
    expect(r.line).toBe("0 passed, 0 failed, 1 skipped");
    expect(r.named).toBe("NFS suite: apt-get update failed (package registry unreachable?)");
  });

  test("its own count line is added; without one (crashed, timed out) it is a failure", () => {
    log("nfs.log", "ok xnode\n  failed: v3 capacity: ledger says 1 bytes\n16 passed, 1 failed\n");
    const failed = count('count_nfs "$D/nfs.log" 1');
    expect(failed.line).toBe("16 passed, 1 failed");
    expect(failed.out.split("\n")).toContain("failed: NFS suite: v3 capacity: ledger says 1 bytes");
    log("nfs-ok.log", "17 passed, 0 failed, 2 skipped\n");
    expect(count('count_nfs "$D/nfs-ok.log" 0').line).toBe("17 passed, 0 failed, 2 skipped");
    log("nfs-cut.log", "== booting the guest\n");
    for (const rc of [0, 1, 124]) expect(count(`count_nfs "$D/nfs-cut.log" ${rc}`).line).toBe("0 passed, 1 failed");
    expect(count('count_nfs "$D/nfs-ok.log" 124').failed).toBe(1);
  });
});

test("the whole run: one broken report among good ones never reads 0 failed", () => {
  const cut = truncated(path.join(dir, "pytest.xml"), 0.6);
  const clean = path.join(dir, "whole-clean.xml");
  fs.writeFileSync(clean, JUNIT.replace('failures="1"', 'failures="0"').replace(/<failure[^]*?<\/failure>/, ""));
  fs.writeFileSync(path.join(dir, "whole-nfs.log"), "NFS suite skipped: not root\n");
  const r = count(
    `passed=1; count_jest jest "${jestReport}" 1; count_junit pytest "${cut}" 1; ` +
      `count_nfs "$D/whole-nfs.log" 77; count_junit wheel "${clean}" 0`,
  );
  expect([r.passed, r.failed, r.skipped]).toEqual([1 + 1 + 2, 1 + 1, 2 + 1 + 1]);
  expect(r.line).toBe("4 passed, 2 failed, 4 skipped");
  expect(r.named).toBe("a.test.js not here; a.test.js later; NFS suite: not root; test_x::test_skip");
  expect(r.out.split("\n")).toContain("failed: jest: a.test.js bad; pytest: report does not parse");
});
