/* The debuggee for the end-to-end gdb tests: main -> outer -> inner, so a
 * backtrace has depth, and a global whose value the tests print. */
#include <stdio.h>

int global_counter = 0;

int inner(int x) {
    global_counter += x;
    return global_counter * 2;
}

int outer(int x) {
    return inner(x + 1) + 1;
}

int main(void) {
    global_counter = 41;
    printf("%d\n", outer(0));
    return 0;
}
