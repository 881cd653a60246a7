// ESLint for the TypeScript engine, its tests and benchmarks (flat config).
// The rule set is the recommended one of ESLint and typescript-eslint, without
// type information (fast, and no tsconfig needed per folder: test/nfs has its
// own): it catches mistakes and leaves layout to Prettier (.prettierrc.json).
// Run by `npm run lint` (scripts/lint.sh).
const { defineConfig } = require("eslint/config");
const js = require("@eslint/js");
const tseslint = require("typescript-eslint");

module.exports = defineConfig(
  {
    ignores: ["dist/", "native/build*/", "wheelhouse/", "models/", ".venv/", ".test-tmp/", "python_shim/", "bench/results/"],
  },
  js.configs.recommended,
  tseslint.configs.recommended,
  {
    // The few CommonJS files (this one, jest.config.js) run on Node as they are.
    files: ["**/*.js"],
    languageOptions: {
      sourceType: "commonjs",
      globals: { require: "readonly", module: "writable", process: "readonly", __dirname: "readonly", console: "readonly" },
    },
    rules: { "@typescript-eslint/no-require-imports": "off" },
  },
  {
    rules: {
      // A leading underscore marks a name unused on purpose; rest siblings
      // are the way to leave fields out of a copy.
      "@typescript-eslint/no-unused-vars": [
        "error",
        { argsIgnorePattern: "^_", varsIgnorePattern: "^_", caughtErrorsIgnorePattern: "^_", ignoreRestSiblings: true },
      ],
      // Validation of names and paths rejects control characters on purpose.
      "no-control-regex": "off",
    },
  },
);
