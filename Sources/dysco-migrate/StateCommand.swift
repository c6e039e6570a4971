import ArgumentParser

// Placeholder: replaced by the ConntrackState work (issue 3).
struct StateCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(commandName: "state", abstract: "Export/import conntrack state.")
}
