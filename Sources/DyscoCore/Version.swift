/// The one version constant: `dysco-migrate --version` and the Debian package
/// (`make deb` reads it from this file) all print it. Raise it with every release.
public enum DyscoVersion {
    public static let string = "0.20.0"
}
