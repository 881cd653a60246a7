// Reads the project's markdown pages as test/docs.test.ts checks them: fenced
// blocks with the marker comment before each, inline code spans, links and
// headings (with GitHub's anchors). Plain string work, no markdown library:
// the pages are ours, and a page this cannot read is a page to fix.
import * as fs from "fs";
import * as path from "path";

export const ROOT = path.resolve(__dirname, "../..");

/** The pages whose commands and names are checked: the README, docs/*.md, bench/RESULTS.md. */
export function pages(): string[] {
  const docs = fs
    .readdirSync(path.join(ROOT, "docs"))
    .filter((f) => f.endsWith(".md"))
    .sort()
    .map((f) => `docs/${f}`);
  return ["README.md", ...docs, "bench/RESULTS.md"];
}

/** What a marker comment on the line right before a fence asks for. */
export type Marker =
  | { kind: "none" }
  /** `<!-- needs: gpu, nfs; tested by <path> -->`: not run here, only checked for syntax. */
  | { kind: "needs"; needs: string[]; testedBy?: string }
  /** `<!-- run -->`: run from the repository root; it must be cheap (--help, a check) and exit 0. */
  | { kind: "run" }
  /** `<!-- run: engine -->`: run in a directory holding ucm_config.yaml, with an engine serving it. */
  | { kind: "engine" }
  /** `<!-- file: <path> -->`: the block is that file without its comment lines. */
  | { kind: "file"; path: string }
  | { kind: "bad"; text: string };

export interface Block {
  page: string;
  /** 1-based line of the opening fence. */
  line: number;
  lang: string;
  text: string;
  marker: Marker;
}

export function parseMarker(comment: string): Marker {
  const body = comment.trim();
  let m = /^needs:\s*([^;]+?)\s*(?:;\s*tested by\s+(\S+))?$/.exec(body);
  if (m)
    return {
      kind: "needs",
      needs: m[1].split(",").map((s) => s.trim()),
      ...(m[2] ? { testedBy: m[2] } : {}),
    };
  if (body === "run") return { kind: "run" };
  if (/^run:\s*engine$/.test(body)) return { kind: "engine" };
  m = /^file:\s*(\S+)$/.exec(body);
  if (m) return { kind: "file", path: m[1] };
  return { kind: "bad", text: body };
}

/** Lines of a page with fenced blocks blanked out (for links, headings and inline code). */
export function prose(text: string): string {
  const out: string[] = [];
  let fence: string | null = null;
  for (const line of text.split("\n")) {
    const m = /^\s*(`{3,}|~{3,})/.exec(line);
    if (fence === null && m) {
      fence = m[1];
      out.push("");
    } else if (fence !== null) {
      if (line.trim() === fence) fence = null;
      out.push("");
    } else out.push(line);
  }
  return out.join("\n");
}

export function blocks(page: string): Block[] {
  const lines = fs.readFileSync(path.join(ROOT, page), "utf8").split("\n");
  const found: Block[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^(\s*)(`{3,}|~{3,})(.*)$/.exec(lines[i]);
    if (!open) continue;
    const indent = open[1].length;
    let j = i + 1;
    while (j < lines.length && lines[j].trim() !== open[2]) j++;
    if (j >= lines.length) throw new Error(`${page}:${i + 1}: fence never closed`);
    const text = lines
      .slice(i + 1, j)
      .map((l) => l.slice(Math.min(indent, l.length - l.trimStart().length)))
      .join("\n");
    const before = i > 0 ? /^\s*<!--(.*)-->\s*$/.exec(lines[i - 1]) : null;
    found.push({ page, line: i + 1, lang: open[3].trim(), text, marker: before ? parseMarker(before[1]) : { kind: "none" } });
    i = j;
  }
  return found;
}

/** Inline code spans outside fenced blocks, with backslash-free content. */
export function inlineCode(text: string): string[] {
  const spans: string[] = [];
  // One or more backticks, then the shortest run up to the same number; spans may wrap a line.
  const re = /(`+)([\s\S]+?)\1/g;
  for (const m of prose(text).matchAll(re)) spans.push(m[2].replace(/\s*\n\s*/g, " ").trim());
  return spans;
}

/** GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens. */
export function slug(heading: string): string {
  return heading
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{N} _-]/gu, "")
    .replace(/ /g, "-");
}

export function anchors(text: string): Set<string> {
  const set = new Set<string>();
  for (const line of prose(text).split("\n")) {
    const m = /^#{1,6}\s+(.*?)\s*#*\s*$/.exec(line);
    if (m) set.add(slug(m[1]));
  }
  return set;
}

/** Markdown links [text](target), outside fenced blocks. */
export function links(text: string): string[] {
  return [...prose(text).matchAll(/\]\(([^)\s]+)\)/g)].map((m) => m[1]);
}
