# Stand-in: the real file writes the extension's config; the tests only check that it is included.
message(STATUS "STUB_SLICER included=GenerateConfig")
