// Library entry: the pieces of the engine, for embedding and tests.
export * from "./config";
export * from "./client";
export * from "./log";
export * from "./protocol";
export { EngineServer } from "./server";
export { Store, Session } from "./store";
export * as native from "./native";
