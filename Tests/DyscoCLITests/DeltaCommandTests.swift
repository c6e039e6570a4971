import ArgumentParser
@testable import DyscoCLI
import Testing

@Suite("delta: a box's sequence delta on the command line")
struct DeltaCommandTests {
    @Test("negative deltas parse without '=' (a box that deleted bytes), the session in either form; a bad tuple is a usage error")
    func parsing() throws {
        let command = try DeltaCommand.parse(["10.0.0.1:40000->10.0.0.9:80", "--forward", "-5", "--reverse", "17"])
        #expect(command.forward == -5 && command.reverse == 17)
        #expect(throws: (any Error).self) { try DeltaCommand.parse(["10.0.0.1:40000-10.0.0.9:80"]) }
        #expect(throws: (any Error).self) { try DeltaCommand.parse(["10.0.0.1:40000->10.0.0.9:99999"]) }
    }
}
