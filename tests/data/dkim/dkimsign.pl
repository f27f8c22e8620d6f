#!/usr/bin/perl
# Sign the message on standard input with Mail::DKIM and print it with the DKIM-Signature
# field on top (the reference signer of the interop tests).
#
# dkimsign.pl --key FILE --domain D --selector S [--algorithm rsa-sha256] [--method relaxed/relaxed]
use strict;
use warnings;
use Getopt::Long;
use Mail::DKIM::Signer;

my %opt = (algorithm => 'rsa-sha256', method => 'relaxed/relaxed');
GetOptions(\%opt, 'key=s', 'domain=s', 'selector=s', 'algorithm=s', 'method=s')
  && $opt{key} && $opt{domain} && $opt{selector}
  or die "usage: dkimsign.pl --key FILE --domain D --selector S [--algorithm A] [--method M]\n";

binmode STDIN;
binmode STDOUT;
my $signer = Mail::DKIM::Signer->new(
    Algorithm => $opt{algorithm},
    Method    => $opt{method},
    Domain    => $opt{domain},
    Selector  => $opt{selector},
    KeyFile   => $opt{key},
);
my $message = '';
while (my $line = <STDIN>) {
    $line =~ s/\r?\n\z/\r\n/;
    $message .= $line;
    $signer->PRINT($line);
}
$signer->CLOSE;
my $signature = $signer->signature;
$signature->prettify_safe;    # b= folded over lines, as signers commonly write it
print $signature->as_string, "\r\n", $message;
