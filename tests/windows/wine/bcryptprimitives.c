/* Test tier only (see scripts/wine-tier): Wine 8 has no bcryptprimitives.dll,
 * which cryptography's _rust.pyd imports for ProcessPrng.  This one-function
 * stand-in forwards to RtlGenRandom (advapi32!SystemFunction036), the
 * generator ProcessPrng replaced on real Windows. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
