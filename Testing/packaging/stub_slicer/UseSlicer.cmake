# Stand-in for Slicer's UseSlicer.cmake: checks the extension metadata and provides the two macros a
# scripted module calls. Each module's lists are printed as "STUB_SLICER module=... scripts=... resources=..."
# lines for the tests, and installed the way Slicer lays them out, so `cmake --install` shows the package.

foreach(name HOMEPAGE CATEGORY CONTRIBUTORS DESCRIPTION ICONURL SCREENSHOTURLS DEPENDS)
  if("${EXTENSION_${name}}" STREQUAL "")
    message(FATAL_ERROR "EXTENSION_${name} must be set before find_package(Slicer)")
  endif()
endforeach()

# All modules of an extension install into one folder with one shared Resources/ folder, so two
# modules listing the same relative path would overwrite each other's file.
set_property(GLOBAL PROPERTY STUB_SLICER_INSTALLED_FILES "")

function(_stub_slicer_install_module_file module_name relative_path)
  get_property(installed GLOBAL PROPERTY STUB_SLICER_INSTALLED_FILES)
  if("${relative_path}" IN_LIST installed)
    message(SEND_ERROR "${module_name}: ${relative_path} is also installed by another module")
  endif()
  set_property(GLOBAL APPEND PROPERTY STUB_SLICER_INSTALLED_FILES "${relative_path}")
  get_filename_component(relative_dir "${relative_path}" DIRECTORY)
  install(FILES "${CMAKE_CURRENT_SOURCE_DIR}/${relative_path}"
    DESTINATION "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${relative_dir}")
endfunction()

function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MODULE "WITH_GENERIC_TESTS;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT MODULE_NAME)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule: NAME is required")
  endif()
  set(scripts "")
  foreach(script IN LISTS MODULE_SCRIPTS)
    # Like the real macro, "X" is accepted when "X.py" exists.
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${script}" AND EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${script}.py")
      set(script "${script}.py")
    endif()
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${script}")
      message(SEND_ERROR "${MODULE_NAME}: SCRIPTS given nonexistent file or directory: ${script}")
    else()
      list(APPEND scripts "${script}")
      _stub_slicer_install_module_file(${MODULE_NAME} "${script}")
    endif()
  endforeach()
  foreach(resource IN LISTS MODULE_RESOURCES)
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${resource}")
      message(SEND_ERROR "${MODULE_NAME}: RESOURCES given nonexistent file or directory: ${resource}")
    else()
      _stub_slicer_install_module_file(${MODULE_NAME} "${resource}")
    endif()
  endforeach()
  message(STATUS "STUB_SLICER module=${MODULE_NAME} generic_tests=${MODULE_WITH_GENERIC_TESTS} scripts=${scripts} resources=${MODULE_RESOURCES}")
endfunction()

function(slicer_add_python_unittest)
  # The real function registers the module's in-Slicer test with ctest; nothing to run here.
endfunction()
