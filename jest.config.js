/** Jest runs the TypeScript tests in test/ with ts-jest, against the real
 * native addon and the real engine process (built by `npm run build`). */
module.exports = {
  testEnvironment: "node",
  roots: ["<rootDir>/test"],
  testMatch: ["**/*.test.ts"],
  transform: { "^.+\\.ts$": ["ts-jest", { tsconfig: "test/tsconfig.json" }] },
  testTimeout: 60000,
};
