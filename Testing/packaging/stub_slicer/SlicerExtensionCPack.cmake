# Stand-in: the real file sets up packaging; the tests only check that it is included last.
message(STATUS "STUB_SLICER included=CPack")
