# Stand-in for Slicer's SlicerConfig.cmake, used by Testing/packaging to configure the extension with
# real cmake but without a Slicer build. It provides only what an extension's CMakeLists.txt uses.
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionGenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/SlicerExtensionCPack.cmake")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.13/qt-scripted-modules")
