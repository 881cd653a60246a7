// The README and docs/ say only what is true of this checkout (issue 28):
// - docs/configuration.md is what scripts/gen_config_doc.js writes from the
//   table of options (core/options.ts), and `ucm-engine --help` lists the same
//   keys with the same defaults, each of which the config parser reads back
//   as the default;
// - every fenced block has a language, and every bash block a marker: one
//   marked `<!-- run -->` is run (from the repository root, `ucm-engine` on
//   PATH being the built engine), one marked `<!-- run: engine -->` is run
//   beside a real engine, one marked `<!-- needs: ... -->` (a GPU, an NFS
//   mount, root, ...) is only checked by `bash -n`; a config in a yaml block
//   is read by the engine's own parser; a `<!-- file: ... -->` block is that
//   file. Nothing runs without its marker saying so: an unmarked bash block
//   fails.
// - every ucm-engine flag, script flag, repository path, link, anchor, option
//   name, environment variable and Python module a page names exists.
// How to mark a block: docs/development.md, "Keeping the docs true".
import { spawn, spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import { parse as parseYaml } from "yaml";
import { parseConfig } from "../core/config";
import { OPTIONS } from "../core/options";
import { CLI, RunningEngine, shortTmp, startEngine, writeConfig } from "./helpers/engine";
import { Block, ROOT, anchors, blocks, inlineCode, links, pages, prose } from "./helpers/markdown";

/** What a marked block may need; anything else is a typo. */
const NEEDS: Record<string, string> = {
  gpu: "an NVIDIA GPU",
  nfs: "an NFS mount",
  root: "root",
  systemd: "a systemd host",
  vllm: "the Python environment with vLLM (python_shim/setup_venv.sh)",
  setup: "minutes of building or installing, or a whole suite",
  network: "the npm registry, PyPI or apt",
  wheel: "the built wheel (npm run wheel)",
  deployment: "a node installed as docs/operations.md says (/etc/ucm/ucm_config.yaml, the wheel in /opt/vllm/venv)",
  fio: "fio",
  bench: "a benchmark: minutes of machine time",
};
const LANGS = new Set(["bash", "text", "yaml", "ini", "python", "json"]);

const PAGES = pages();
const BLOCKS: Block[] = PAGES.flatMap(blocks);
const bash = BLOCKS.filter((b) => b.lang === "bash");
const at = (b: Block) => `${b.page}:${b.line}`;
const read = (rel: string) => fs.readFileSync(path.join(ROOT, rel), "utf8");

/** Runs a bash script in a process group of its own; resolves with its exit code (null when killed at the time limit) and output. */
function runBash(script: string, cwd: string, env: NodeJS.ProcessEnv, timeoutMs = 60000): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const p = spawn("bash", ["-e", "-o", "pipefail", "-c", script], { cwd, env, stdio: ["ignore", "pipe", "pipe"], detached: true });
    let out = "";
    p.stdout.on("data", (d) => (out += d));
    p.stderr.on("data", (d) => (out += d));
    const t = setTimeout(() => process.kill(-p.pid!, "SIGKILL"), timeoutMs);
    p.on("exit", (code) => {
      clearTimeout(t);
      resolve({ code, out });
    });
  });
}

/** A PATH whose `ucm-engine` is the built engine (what the wheel's console script execs); made once, removed at the end. */
let binDir: string | undefined;
function enginePath(): NodeJS.ProcessEnv {
  if (!binDir) {
    binDir = shortTmp("ucmdoc-bin-");
    const exe = path.join(binDir, "ucm-engine");
    fs.writeFileSync(exe, `#!/bin/sh\nexec ${JSON.stringify(process.execPath)} ${JSON.stringify(CLI)} "$@"\n`, { mode: 0o755 });
  }
  return { ...process.env, PATH: `${binDir}:${process.env.PATH ?? ""}` };
}
afterAll(() => {
  if (binDir) fs.rmSync(binDir, { recursive: true, force: true });
});

function cli(args: string[]): string {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: "utf8", timeout: 30000 });
  if (r.status !== 0) throw new Error(`ucm-engine ${args.join(" ")} exited ${r.status}: ${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** key -> default, from the option lines of `ucm-engine --help`. */
function helpDefaults(help: string): Map<string, string> {
  const lines = help.split("\n");
  const start = lines.findIndex((l) => l.startsWith("Keys of ucm_connector_config"));
  if (start < 0) throw new Error(`no option list in:\n${help}`);
  const out = new Map<string, string>();
  for (const l of lines.slice(start + 1)) {
    const m = /^ {2}(\S+) {2,}(\S+) {2,}\S/.exec(l);
    if (m) out.set(m[1], m[2]);
  }
  return out;
}

/** key -> default, from the table of docs/configuration.md ("required" reads as "(required)", as --help says). */
function referenceDefaults(): Map<string, string> {
  const out = new Map<string, string>();
  for (const m of read("docs/configuration.md").matchAll(/^\| `([^`]+)` \| (?:`([^`]*)`|(required)) \|/gm))
    out.set(m[1], m[3] ? "(required)" : m[2]);
  return out;
}

describe("the configuration reference is generated from core/options.ts", () => {
  test("docs/configuration.md is what scripts/gen_config_doc.js writes", () => {
    const r = spawnSync(process.execPath, [path.join(ROOT, "scripts/gen_config_doc.js"), "--stdout"], { encoding: "utf8", timeout: 30000 });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
    // On a difference: run `npm run build && node scripts/gen_config_doc.js`.
    expect(read("docs/configuration.md")).toBe(r.stdout);
  });

  test("ucm-engine --help and serve --help list every key with the default the reference gives", () => {
    const ref = referenceDefaults();
    expect([...ref.keys()].sort()).toEqual(["storage_backends", ...Object.keys(OPTIONS)].sort());
    for (const args of [["--help"], ["serve", "--help"]]) {
      const help = helpDefaults(cli(args));
      expect({ args, defaults: Object.fromEntries(help) }).toEqual({ args, defaults: Object.fromEntries(ref) });
    }
  });

  test("each default the reference gives, written in a config, is read back as the default", () => {
    const dir = shortTmp("ucmdoc-");
    try {
      const base = { ucm_connector_name: "UcmNfsStore", ucm_connector_config: { storage_backends: dir } };
      const plain = parseConfig(base).config as unknown as Record<string, unknown>;
      for (const [k, text] of referenceDefaults()) {
        if (k === "storage_backends") continue;
        const doc = { ...base, ucm_connector_config: { storage_backends: dir, [k]: parseYaml(`v: ${text}`).v } };
        const { config, warnings } = parseConfig(doc);
        expect({ k, text, warnings, value: (config as unknown as Record<string, unknown>)[OPTIONS[k].key] }).toEqual({
          k,
          text,
          warnings: [],
          value: plain[OPTIONS[k].key],
        });
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("fenced blocks of README.md, docs/*.md and bench/RESULTS.md", () => {
  test("there are blocks of each kind", () => {
    expect(bash.filter((b) => b.marker.kind === "run").length).toBeGreaterThanOrEqual(2);
    expect(bash.filter((b) => b.marker.kind === "engine").length).toBeGreaterThanOrEqual(1);
    expect(bash.filter((b) => b.marker.kind === "needs").length).toBeGreaterThanOrEqual(10);
  });

  test.each(BLOCKS.map((b) => [at(b), b] as const))("%s: a known language and a well-formed marker", (_, b) => {
    expect({ at: at(b), lang: b.lang, known: LANGS.has(b.lang) }).toEqual({ at: at(b), lang: b.lang, known: true });
    const m = b.marker;
    if (m.kind === "bad") throw new Error(`${at(b)}: unknown marker <!-- ${m.text} -->`);
    if (b.lang === "bash" && m.kind === "none")
      throw new Error(`${at(b)}: a bash block needs a marker before it: <!-- run -->, <!-- run: engine --> or <!-- needs: ... -->`);
    if ((m.kind === "needs" || m.kind === "run" || m.kind === "engine") && b.lang !== "bash")
      throw new Error(`${at(b)}: a ${m.kind} marker on a ${b.lang} block`);
    if (m.kind === "needs") {
      for (const n of m.needs) if (!(n in NEEDS)) throw new Error(`${at(b)}: unknown need "${n}"; known: ${Object.keys(NEEDS).join(", ")}`);
      if (m.testedBy && !fs.existsSync(path.join(ROOT, m.testedBy)))
        throw new Error(`${at(b)}: tested by ${m.testedBy}, which does not exist`);
    }
    if (m.kind === "file") {
      const file = read(m.path)
        .split("\n")
        .filter((l) => !l.startsWith("#"))
        .join("\n")
        .trimEnd();
      expect(b.text.trimEnd()).toBe(file);
    }
  });

  test.each(bash.map((b) => [at(b), b] as const))("%s: bash -n", (_, b) => {
    const r = spawnSync("bash", ["-n"], { input: b.text, encoding: "utf8" });
    expect({ at: at(b), status: r.status, stderr: r.stderr }).toEqual({ at: at(b), status: 0, stderr: "" });
  });

  const runnable = bash.filter((b) => b.marker.kind === "run");
  test.each(runnable.map((b) => [at(b), b] as const))(
    "%s runs from the repository root and exits 0",
    async (_, b) => {
      const r = await runBash(b.text, ROOT, enginePath());
      expect({ at: at(b), code: r.code, out: r.code === 0 ? "" : r.out }).toEqual({ at: at(b), code: 0, out: "" });
    },
    90000,
  );

  describe("blocks run beside an engine serving ucm_config.yaml", () => {
    let dir: string;
    let engine: RunningEngine;
    beforeAll(async () => {
      dir = shortTmp("ucmdoc-");
      fs.mkdirSync(path.join(dir, "store"));
      const cfg = writeConfig(dir, { storage_backends: path.join(dir, "store"), endpoint: `ipc://${dir}/e.sock` }, "ucm_config.yaml");
      engine = await startEngine(cfg);
    });
    afterAll(async () => {
      await engine?.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    });
    const withEngine = bash.filter((b) => b.marker.kind === "engine");
    test.each(withEngine.map((b) => [at(b), b] as const))(
      "%s exits 0",
      async (_, b) => {
        const r = await runBash(b.text, dir, enginePath());
        expect({ at: at(b), code: r.code, out: r.code === 0 ? "" : r.out }).toEqual({ at: at(b), code: 0, out: "" });
      },
      90000,
    );
  });

  const configs = BLOCKS.filter((b) => b.lang === "yaml" && /ucm_connector_name|ucm_connectors/.test(b.text));
  test.each(configs.map((b) => [at(b), b] as const))("%s: the engine's parser reads the config without a warning", (_, b) => {
    const dir = shortTmp("ucmdoc-");
    try {
      const doc = parseYaml(b.text) as Record<string, unknown>;
      const entries = (doc.ucm_connectors as Array<Record<string, unknown>> | undefined) ?? [doc];
      // The page's storage directory (a mount, /tmp) is not this machine's: a fresh one of this user stands in.
      for (const e of entries) (e.ucm_connector_config as Record<string, unknown>).storage_backends = dir;
      expect({ at: at(b), warnings: parseConfig(doc).warnings }).toEqual({ at: at(b), warnings: [] });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("what the pages name exists", () => {
  const texts = new Map(PAGES.map((p) => [p, read(p)] as const));
  /** Code spans and bash blocks: where commands and names are written. */
  const code = new Map(
    PAGES.map((p) => [p, [...inlineCode(texts.get(p)!), ...bash.filter((b) => b.page === p).map((b) => b.text)]] as const),
  );

  /** The project's own code and configs, which a name in the docs must come from (not this test: it names them too). */
  const SELF = ["test/docs.test.ts", "test/helpers/markdown.ts"];
  const corpus = (() => {
    const parts: string[] = [];
    const walk = (rel: string) => {
      const abs = path.join(ROOT, rel);
      for (const e of fs.readdirSync(abs, { withFileTypes: true })) {
        const r = path.join(rel, e.name);
        if (e.isDirectory()) {
          if (!["node_modules", "build", "build-emu", "__pycache__", "results", "models"].includes(e.name)) walk(r);
        } else if (/\.(ts|js|py|sh|cc|h|cu|yaml|service|txt|toml)$/.test(e.name) && !SELF.includes(r))
          parts.push(fs.readFileSync(path.join(ROOT, r), "utf8"));
      }
    };
    for (const d of ["core", "native", "python_shim", "test", "bench", "examples", "scripts", "packaging"]) walk(d);
    return parts.join("\n");
  })();
  // The process metrics are prom-client's defaults, which core/metrics.ts registers with the prefix ucm_.
  const promDefaults = fs
    .readdirSync(path.join(ROOT, "node_modules/prom-client/lib/metrics"))
    .filter((f) => f.endsWith(".js"))
    .map((f) => fs.readFileSync(path.join(ROOT, "node_modules/prom-client/lib/metrics", f), "utf8"))
    .join("\n");
  const word = (w: string) => new RegExp(`(?<![\\w])${w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}(?![\\w])`);
  const inCorpus = (w: string) =>
    word(w).test(corpus) || (w.startsWith("ucm_") && corpus.includes('prefix: "ucm_"') && word(w.slice(4)).test(promDefaults));

  /** Every path under these directories a page names, as written (globs and {a,b} allowed). */
  const PATH_RE = /(?<![\w./-])((?:examples|bench|scripts|test|core|native|python_shim|packaging|docs)\/[\w./*{},-]*[\w*}])/g;
  function exists(p: string): boolean {
    const brace = /\{([^}]*)\}/.exec(p);
    if (brace) return brace[1].split(",").every((alt) => exists(p.replace(brace[0], alt)));
    if (!p.includes("*")) return fs.existsSync(path.join(ROOT, p));
    const dir = path.dirname(p);
    const re = new RegExp(
      `^${path
        .basename(p)
        .replace(/[.+?^$()|[\]\\]/g, "\\$&")
        .replace(/\*/g, ".*")}$`,
    );
    return fs.existsSync(path.join(ROOT, dir)) && fs.readdirSync(path.join(ROOT, dir)).some((f) => re.test(f));
  }

  test.each(PAGES)("%s: every repository path exists", (page) => {
    const missing: string[] = [];
    for (const m of texts.get(page)!.matchAll(PATH_RE)) {
      const p = m[1].replace(/::.*$/, "");
      // Build outputs: made by npm install and the demo, not in a fresh checkout.
      if (/^native\/build|^examples\/models\//.test(p)) continue;
      if (!exists(p)) missing.push(p);
    }
    for (const m of texts.get(page)!.matchAll(/(?<![\w./-])dist\/((?:core|bench)\/[\w-]+)\.js/g))
      if (!fs.existsSync(path.join(ROOT, `${m[1]}.ts`))) missing.push(`${m[0]} (from ${m[1]}.ts)`);
    expect(missing).toEqual([]);
  });

  test.each(PAGES)("%s: every relative link leads to a file, and its #anchor to a heading there", (page) => {
    const broken: string[] = [];
    for (const target of links(texts.get(page)!)) {
      if (/^[a-z]+:/.test(target)) continue;
      const [file, anchor] = target.split("#");
      const abs = file ? path.resolve(ROOT, path.dirname(page), file) : path.join(ROOT, page);
      if (!fs.existsSync(abs)) broken.push(`${target} (no file)`);
      else if (anchor !== undefined && abs.endsWith(".md") && !anchors(fs.readFileSync(abs, "utf8")).has(anchor))
        broken.push(`${target} (no heading with that anchor)`);
    }
    expect(broken).toEqual([]);
  });

  /** Each command's usage line, from the built engine's --help. */
  let usage: Record<string, string> | undefined;
  test.each(PAGES)("%s: every ucm-engine flag is one its command's --help names", (page) => {
    usage ??= Object.fromEntries(["serve", "health", "stats", "bench"].map((c) => [c, cli([c, "--help"]).split("\n")[0]]));
    const unknown: string[] = [];
    for (const text of code.get(page)!)
      for (const m of text.matchAll(/(?:ucm-engine|dist\/core\/cli\.js)\s+(serve|health|stats|bench)\b([^\n`|;&#]*)/g))
        for (const f of m[2].matchAll(/(?<=\s|^)--[a-z][a-z-]*/g))
          if (f[0] !== "--help" && !new RegExp(`${f[0]}(?![a-z-])`).test(usage[m[1]])) unknown.push(`ucm-engine ${m[1]} ${f[0]}`);
    expect(unknown).toEqual([]);
  });

  test.each(PAGES)("%s: every flag given to one of the repository's scripts occurs in that script", (page) => {
    const unknown: string[] = [];
    const sources = (script: string): string => {
      const text = read(script);
      if (!script.endsWith(".sh")) return text;
      // A shell script passes flags on to the scripts beside it that it names.
      const dir = path.dirname(script);
      const named = [...text.matchAll(/([\w-]+\.(?:py|sh|js|ts))/g)].map((m) => path.join(dir, m[1]));
      return [text, ...named.filter((f) => fs.existsSync(path.join(ROOT, f))).map(read)].join("\n");
    };
    for (const text of code.get(page)!)
      for (const m of text.matchAll(
        /(?<![\w./-])(dist\/bench\/[\w-]+\.js|(?:bench|examples|scripts|test)\/[\w/-]+\.(?:py|sh|js|ts))([^\n`|;&#]*)/g,
      )) {
        const script = m[1].startsWith("dist/") ? m[1].replace(/^dist\//, "").replace(/\.js$/, ".ts") : m[1];
        if (!fs.existsSync(path.join(ROOT, script))) continue; // the path test names it
        const src = sources(script);
        for (const f of m[2].matchAll(/(?<=\s)--([a-z][\w-]*)/g))
          if (!src.includes(f[1]) && !src.includes(f[1].replace(/-/g, "_"))) unknown.push(`${m[1]} --${f[1]}`);
      }
    expect(unknown).toEqual([]);
  });

  test.each(PAGES)("%s: every option, setting and environment variable named in code is the code's", (page) => {
    const unknown: string[] = [];
    const spans = inlineCode(texts.get(page)!);
    for (const s of spans) {
      // `metricsPort: 9464`: a key of ucm_connector_config, written as in the file.
      const assign = /^([a-z]+[A-Z]\w*):\s/.exec(s);
      if (assign && !(assign[1] in OPTIONS)) unknown.push(`${s} (no such key in core/options.ts)`);
      // `lookupCacheTtlS`: an option, or a name the code uses (a stats field, a function).
      if (/^[a-z]+[A-Z]\w*$/.test(s) && !(s in OPTIONS) && !inCorpus(s)) unknown.push(`${s} (neither an option nor in the code)`);
    }
    for (const text of code.get(page)!) {
      // ucm_* (connector settings, metrics, files) and UCM_* (environment variables).
      for (const m of text.matchAll(/(?<![\w/.-])(ucm_[a-z0-9_]*[a-z0-9]|UCM_[A-Z0-9_]*[A-Z0-9])(?![\w])/g))
        if (!inCorpus(m[1])) unknown.push(`${m[1]} (not in the code)`);
      // camelCase keys of yaml written in a bash block or span: `capacity: 500GiB` is covered above.
    }
    for (const b of BLOCKS.filter((x) => x.page === page && x.lang === "yaml"))
      for (const m of b.text.matchAll(/^\s+([a-z]+[A-Z]\w*):/gm))
        if (!(m[1] in OPTIONS)) unknown.push(`${m[1]} (yaml key not in core/options.ts)`);
    expect(unknown).toEqual([]);
  });

  test.each(PAGES)("%s: every Python module (and name in it) exists in python_shim/", (page) => {
    const missing: string[] = [];
    const names = [
      ...inlineCode(texts.get(page)!).flatMap((s) => [...s.matchAll(/(?<![\w.])ucm(?:\.\w+)+/g)].map((m) => m[0])),
      ...bash
        .filter((b) => b.page === page)
        .flatMap((b) => [...b.text.matchAll(/"kv_connector_module_path":\s*"([\w.]+)"/g)].map((m) => m[1])),
    ];
    for (const name of names) {
      const parts = name.split(".");
      let dir = path.join(ROOT, "python_shim");
      let module: string | null = null;
      let i = 0;
      for (; i < parts.length; i++) {
        const d = path.join(dir, parts[i]);
        if (fs.existsSync(path.join(d, "__init__.py"))) {
          dir = d;
          module = path.join(d, "__init__.py");
        } else if (fs.existsSync(`${d}.py`)) {
          module = `${d}.py`;
          i++;
          break;
        } else break;
      }
      const rest = parts.slice(i);
      const text = module ? fs.readFileSync(module, "utf8") : "";
      if (!module || i < 1 || rest.length > 2 || rest.some((r) => !new RegExp(`\\b${r}\\b`).test(text))) missing.push(name);
    }
    // A block's kv_connector is a class of the module its kv_connector_module_path names.
    for (const b of bash.filter((x) => x.page === page)) {
      const modules = [...b.text.matchAll(/"kv_connector_module_path":\s*"([\w.]+)"/g)].map(
        (m) => path.join("python_shim", ...m[1].split(".")) + ".py",
      );
      for (const m of b.text.matchAll(/"kv_connector":\s*"(\w+)"/g))
        if (!modules.some((f) => fs.existsSync(path.join(ROOT, f)) && new RegExp(`^class ${m[1]}\\b`, "m").test(read(f))))
          missing.push(`kv_connector ${m[1]}`);
    }
    expect(missing).toEqual([]);
  });

  test("the README is short, starts with the two commands' section, and names the test command", () => {
    const readme = texts.get("README.md")!;
    expect(readme.split("\n").length).toBeLessThanOrEqual(300);
    expect(readme).toContain("bash examples/run_demo.sh");
    expect(readme).toContain("bash test/run_all.sh");
    expect(readme).toContain("N passed, N failed");
    expect(prose(readme)).toMatch(/^## Quick start$/m);
  });
});
