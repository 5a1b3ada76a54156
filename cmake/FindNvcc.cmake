# nbretr_find_nvcc(<out>): the real nvcc of a CUDA toolkit, or "" when none. Looks at
# $CUDACXX only when it is set, else $CUDA_HOME (CUDA_PATH, CUDA_TOOLKIT_ROOT_DIR), PATH and
# /usr/local/cuda.
# The nvcc first on PATH may be a wrapper script outside the toolkit (its directory then
# has no include/ or lib64/); CMake and CUDAToolkit need the binary inside <root>/bin, so
# ask nvcc for its TOP (`nvcc --dryrun` prints it).
function(nbretr_find_nvcc out)
  set(_cands "")
  if(DEFINED ENV{CUDACXX} AND NOT "$ENV{CUDACXX}" STREQUAL "")
    # An explicit choice: that nvcc or none (never silently another one).
    list(APPEND _cands "$ENV{CUDACXX}")
  else()
    foreach(_v CUDA_HOME CUDA_PATH CUDA_TOOLKIT_ROOT_DIR)
      if(DEFINED ENV{${_v}})
        list(APPEND _cands "$ENV{${_v}}/bin/nvcc")
      endif()
    endforeach()
    find_program(_nvcc_on_path nvcc)
    if(_nvcc_on_path)
      list(APPEND _cands "${_nvcc_on_path}")
    endif()
    list(APPEND _cands /usr/local/cuda/bin/nvcc)
  endif()
  foreach(_c IN LISTS _cands)
    if(EXISTS "${_c}")
      set(_probe "${CMAKE_CURRENT_BINARY_DIR}/nbretr_nvcc_probe.cu")
      file(WRITE "${_probe}" "")
      execute_process(COMMAND "${_c}" --dryrun -c "${_probe}" -o "${_probe}.o"
                      WORKING_DIRECTORY "${CMAKE_CURRENT_BINARY_DIR}"
                      OUTPUT_VARIABLE _o ERROR_VARIABLE _e RESULT_VARIABLE _rc)
      string(REGEX MATCH "TOP=([^\n]*)" _m "${_o}${_e}")
      if(_m)
        get_filename_component(_top "${CMAKE_MATCH_1}" ABSOLUTE)
        if(EXISTS "${_top}/bin/nvcc")
          set(${out} "${_top}/bin/nvcc" PARENT_SCOPE)
          set(CUDAToolkit_ROOT "${_top}" PARENT_SCOPE)
          return()
        endif()
      endif()
      if(_rc EQUAL 0)
        set(${out} "${_c}" PARENT_SCOPE)
        return()
      endif()
    endif()
  endforeach()
  set(${out} "" PARENT_SCOPE)
endfunction()
