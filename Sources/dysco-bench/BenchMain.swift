// The `dysco-bench` executable: `BenchCommand.main()`. The commands live in the DyscoBenchCLI library (as
// swift-nio keeps its executables thin), where the help snapshot tests reach them. `@main` on the command type
// selects `AsyncParsableCommand.main()` (see Sources/dysco-migrate/DyscoMigrateMain.swift).
import DyscoBenchCLI

@main
extension BenchCommand {}
